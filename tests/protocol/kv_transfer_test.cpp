// The KV transfer messages' homes (protocol/kv_*.h): an offer outside the
// receiver's limits, a chunk of another transfer or past the shard, and a
// commit whose totals disagree are refused with errors that say which
// field and which limit.
#include <doctest/doctest.h>

#include <capnp/message.h>

#include <vector>

#include "protocol/kv_abort.h"
#include "protocol/kv_accept.h"
#include "protocol/kv_chunk.h"
#include "protocol/kv_commit.h"
#include "protocol/kv_committed.h"
#include "protocol/kv_offer.h"
#include "protocol/kv_reject.h"

namespace fmwire::protocol {
namespace {

constexpr KvOfferLimits kReceiver{.model_fingerprint = 42, .layers = 4, .kv_heads = 2, .head_dim = 8,
                                   .dtype = DType::FLOAT16, .max_total_bytes = 1 << 20};
// One block of the offer below: 4 layers x k,v x 2 heads x 8 dims x 2 bytes x 16 tokens.
constexpr std::uint64_t kBlockBytes = 4 * 2 * 2 * 8 * 2 * 16;

// An offer the receiver above accepts, changed by `change`.
template <typename Change>
std::optional<KvEndError> check_offer(Change&& change) {
  capnp::MallocMessageBuilder message;
  const std::vector<std::uint64_t> hashes{7, 8};
  KvOfferBuilder offer(message.initRoot<KvOffer>());
  offer.request_id("r").model_fingerprint(42).layers(0, 4).tokens(0, 40).block_tokens(16).geometry(4, 2, 8);
  offer.dtype(DType::FLOAT16).total_bytes(3 * kBlockBytes).chunk_bytes(kBlockBytes).compression(Compression::ZSTD);
  offer.timeout_us(5).prefix_hashes(hashes);
  change(offer);
  return KvOfferReader(message.getRoot<KvOffer>().asReader()).check(kReceiver);
}

TEST_CASE("a KV offer within the receiver's limits passes, and reads back as built") {
  capnp::MallocMessageBuilder message;
  KvOfferBuilder(message.initRoot<KvOffer>()).request_id("r-1").layers(1, 3).tokens(16, 48).total_bytes(99);
  const KvOfferReader offer = message.getRoot<KvOffer>().asReader();
  CHECK(offer.request_id() == "r-1");
  CHECK(offer.layer_begin() == 1);
  CHECK(offer.layer_end() == 3);
  CHECK(offer.token_begin() == 16);
  CHECK(offer.token_end() == 48);
  CHECK(offer.total_bytes() == 99);
  CHECK_FALSE(check_offer([](KvOfferBuilder&) {}).has_value());
}

TEST_CASE("a KV offer in another block size passes: the receiver re-blocks") {
  CHECK_FALSE(check_offer([](KvOfferBuilder& offer) {
    offer.block_tokens(32).total_bytes(2 * 2 * kBlockBytes).chunk_bytes(2 * kBlockBytes).prefix_hashes({});
  }).has_value());
}

TEST_CASE("a KV offer outside the receiver's limits is refused with a typed reason, naming the field and the limit") {
  auto other_model = check_offer([](KvOfferBuilder& offer) { offer.model_fingerprint(41); });
  REQUIRE(other_model.has_value());
  CHECK(other_model->reason == KvEnd::MODEL_MISMATCH);
  CHECK(other_model->message == "KV offer for model fingerprint 41; this side runs 42");
  auto heads = check_offer([](KvOfferBuilder& offer) { offer.geometry(4, 4, 8); });
  REQUIRE(heads.has_value());
  CHECK(heads->reason == KvEnd::LAYOUT_MISMATCH);
  CHECK(heads->message == "KV offer of a model with 4 layers, 4 KV heads of 8; this side's has 4, 2 of 8");
  auto dtype = check_offer([](KvOfferBuilder& offer) { offer.dtype(DType::BFLOAT16); });
  REQUIRE(dtype.has_value());
  CHECK(dtype->reason == KvEnd::LAYOUT_MISMATCH);
  auto layers = check_offer([](KvOfferBuilder& offer) { offer.layers(1, 4); });
  REQUIRE(layers.has_value());
  CHECK(layers->reason == KvEnd::LAYOUT_MISMATCH);
  CHECK(layers->message == "KV offer of layers [1, 4); this side takes whole models, layers [0, 4)");
  CHECK(check_offer([](KvOfferBuilder& offer) { offer.tokens(0, 0); })->reason == KvEnd::BAD_MESSAGE);
  auto total = check_offer([](KvOfferBuilder& offer) { offer.total_bytes(4096); });
  REQUIRE(total.has_value());
  CHECK(total->reason == KvEnd::BAD_MESSAGE);
  CHECK(total->message == "KV offer of 4096 bytes; 3 blocks of 4096 bytes are 12288");
  auto chunks = check_offer([](KvOfferBuilder& offer) { offer.chunk_bytes(100); });
  REQUIRE(chunks.has_value());
  CHECK(chunks->message == "KV offer in chunks of 100 bytes; chunks are whole blocks of 4096");
  const std::vector<std::uint64_t> three{1, 2, 3};
  auto hashes = check_offer([&](KvOfferBuilder& offer) { offer.prefix_hashes(three); });
  REQUIRE(hashes.has_value());
  CHECK(hashes->message == "KV offer with 3 prefix hashes for 2 full blocks; at most one per full block");
  auto large = check_offer([](KvOfferBuilder& offer) {
    offer.tokens(0, 16 * 300).total_bytes(300 * kBlockBytes);
  });
  REQUIRE(large.has_value());
  CHECK(large->reason == KvEnd::NO_CAPACITY);
  CHECK(large->code() == ErrorCode::OVERLOADED);
  CHECK(large->message == "KV offer of 1228800 bytes; this side takes at most 1048576 per transfer");
}

TEST_CASE("a KV chunk of an earlier generation, over the chunk limit or past the shard is refused") {
  const KvTransferRef accepted{3, 7};
  capnp::MallocMessageBuilder message;
  KvChunkBuilder chunk(message.initRoot<KvChunk>());
  chunk.transfer(accepted).offset(4096);
  const KvChunkReader reader = message.getRoot<KvChunk>().asReader();
  CHECK(reader.transfer() == accepted);
  CHECK_FALSE(reader.check(accepted, 8192, 4096, 4096).has_value());

  auto stale = reader.check({3, 8}, 8192, 4096, 4096);
  REQUIRE(stale.has_value());
  CHECK(stale->code == ErrorCode::TRANSFER_ABORTED);
  CHECK(stale->message == "KvChunk for transfer 3 generation 7; this stream's is transfer 3 generation 8");
  auto large = reader.check(accepted, 1 << 20, 1024, 4096);
  REQUIRE(large.has_value());
  CHECK(large->code == ErrorCode::LIMIT_EXCEEDED);
  auto past = reader.check(accepted, 6000, 4096, 4096);
  REQUIRE(past.has_value());
  CHECK(past->message == "KvChunk of bytes [4096, 8192) of a shard of 6000 bytes");
}

TEST_CASE("a KV commit whose totals disagree with what arrived is refused with both counts") {
  const KvTransferRef accepted{1, 1};
  capnp::MallocMessageBuilder message;
  KvCommitBuilder(message.initRoot<KvCommit>()).transfer(accepted).totals(8192, 2);
  const KvCommitReader commit = message.getRoot<KvCommit>().asReader();
  CHECK_FALSE(commit.check(accepted, 8192, 2).has_value());
  auto short_by_one = commit.check(accepted, 4096, 1);
  REQUIRE(short_by_one.has_value());
  CHECK(short_by_one->message == "KvCommit says 8192 bytes in 2 chunks; 4096 bytes in 1 chunks arrived");
}

TEST_CASE("the KV session's answers read back as built") {
  const KvTransferRef transfer{5, 2};
  capnp::MallocMessageBuilder accept_message;
  KvAcceptBuilder(accept_message.initRoot<KvAccept>()).transfer(transfer).max_chunk_bytes(1024).credit_bytes(4096);
  const KvAcceptReader accept = accept_message.getRoot<KvAccept>().asReader();
  CHECK(accept.transfer() == transfer);
  CHECK(accept.max_chunk_bytes() == 1024);
  CHECK(accept.credit_bytes() == 4096);

  capnp::MallocMessageBuilder reject_message;
  KvRejectBuilder(reject_message.initRoot<KvReject>()).error({ErrorCode::OVERLOADED, "no free blocks"}, true);
  const KvRejectReader reject = reject_message.getRoot<KvReject>().asReader();
  CHECK(reject.code() == ErrorCode::OVERLOADED);
  CHECK(reject.message() == "no free blocks");
  CHECK(reject.retryable());

  capnp::MallocMessageBuilder committed_message;
  KvCommittedBuilder(committed_message.initRoot<KvCommitted>()).transfer(transfer).blocks_stored(3);
  const KvCommittedReader committed = committed_message.getRoot<KvCommitted>().asReader();
  CHECK(committed.transfer() == transfer);
  CHECK(committed.blocks_stored() == 3);

  capnp::MallocMessageBuilder abort_message;
  KvAbortBuilder(abort_message.initRoot<KvAbort>()).transfer(transfer).error({ErrorCode::DIGEST_MISMATCH, "chunk 2"});
  const KvAbortReader abort = abort_message.getRoot<KvAbort>().asReader();
  CHECK(abort.transfer() == transfer);
  CHECK(abort.code() == ErrorCode::DIGEST_MISMATCH);
  CHECK(abort.message() == "chunk 2");
}

}  // namespace
}  // namespace fmwire::protocol
