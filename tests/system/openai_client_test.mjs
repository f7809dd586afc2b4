// The fmwire gateway through OpenAI's official Node SDK (the `openai`
// package, pinned in node/package.json and installed there by
// `npm ci --prefix tests/system/node`), as an application would use it.
//
//     node openai_client_test.mjs BASE_URL MODEL [API_KEY]
//
// BASE_URL is the gateway's http://HOST:PORT/v1. With API_KEY, the gateway
// was started with that key: requests carry it, and a wrong key must be
// refused. Prints one "ok ..." line per check; exits 1 at the first failure.
import { createRequire } from 'node:module';

const require = createRequire(new URL('./node/package.json', import.meta.url));
const { OpenAI, AuthenticationError, BadRequestError } = require('openai');

const [baseURL, model, apiKey] = process.argv.slice(2);
if (!baseURL || !model) {
  console.error('usage: node openai_client_test.mjs BASE_URL MODEL [API_KEY]');
  process.exit(2);
}

// No retries: a refusal must reach the test as it is, not be retried away.
const client = new OpenAI({ baseURL, apiKey: apiKey ?? 'no-key-needed', maxRetries: 0, timeout: 20_000 });
const messages = [{ role: 'user', content: 'Hello' }];
const finishReasons = ['stop', 'length'];

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function expectError(ErrorType, status, call) {
  try {
    await call();
  } catch (error) {
    check(error instanceof ErrorType, `expected ${ErrorType.name}, got ${error?.constructor?.name}: ${error}`);
    check(error.status === status, `expected status ${status}, got ${error.status}`);
    return error;
  }
  throw new Error(`expected ${ErrorType.name}, the request succeeded`);
}

const checks = {
  async 'models lists the served model'() {
    const models = await client.models.list();
    const ids = models.data.map((entry) => entry.id);
    check(ids.includes(model), `models ${JSON.stringify(ids)}`);
  },

  async 'chat completion streamed: chunks arrive, text, finish_reason'() {
    const stream = await client.chat.completions.create({ model, messages, max_tokens: 16, stream: true });
    let chunks = 0;
    let text = '';
    let finishReason = null;
    for await (const chunk of stream) {
      chunks += 1;
      check(chunk.object === 'chat.completion.chunk', `chunk ${JSON.stringify(chunk)}`);
      for (const choice of chunk.choices) {
        text += choice.delta?.content ?? '';
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
    check(chunks >= 2, `${chunks} chunk(s)`);
    check(text.length > 0, 'no text');
    check(finishReasons.includes(finishReason), `finish_reason ${finishReason}`);
  },

  async 'chat completion not streamed'() {
    const completion = await client.chat.completions.create({ model, messages, max_tokens: 8 });
    check(completion.object === 'chat.completion', `object ${completion.object}`);
    const choice = completion.choices[0];
    check(choice.message.role === 'assistant', `role ${choice.message.role}`);
    check(choice.message.content.length > 0, 'no content');
    check(choice.finish_reason === 'length', `finish_reason ${choice.finish_reason}`);
    check(completion.usage.completion_tokens === 8, `usage ${JSON.stringify(completion.usage)}`);
    check(completion.usage.prompt_tokens > 0, `usage ${JSON.stringify(completion.usage)}`);
  },

  async 'completion streamed'() {
    const stream = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 12, stream: true });
    let chunks = 0;
    let text = '';
    let finishReason = null;
    for await (const chunk of stream) {
      chunks += 1;
      for (const choice of chunk.choices) {
        text += choice.text ?? '';
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
    check(chunks >= 2, `${chunks} chunk(s)`);
    check(text.length > 0, 'no text');
    check(finishReason === 'length', `finish_reason ${finishReason}`);
  },

  async 'completion not streamed'() {
    const completion = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 8 });
    check(completion.object === 'text_completion', `object ${completion.object}`);
    check(completion.choices[0].text.length > 0, 'no text');
    check(completion.choices[0].finish_reason === 'length', `finish_reason ${completion.choices[0].finish_reason}`);
    check(completion.usage.completion_tokens === 8, `usage ${JSON.stringify(completion.usage)}`);
  },

  async 'stream_options include_usage gives usage'() {
    const stream = await client.chat.completions.create({
      model, messages, max_tokens: 10, stream: true, stream_options: { include_usage: true },
    });
    let usage = null;
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
    }
    check(usage !== null, 'no chunk carried usage');
    check(usage.completion_tokens === 10, `usage ${JSON.stringify(usage)}`);
    check(usage.prompt_tokens > 0 && usage.total_tokens === usage.prompt_tokens + usage.completion_tokens,
      `usage ${JSON.stringify(usage)}`);
  },

  async 'a bad request is a BadRequestError'() {
    await expectError(BadRequestError, 400,
      () => client.chat.completions.create({ model, messages, max_tokens: -1 }));
  },

  async 'tools, which the gateway does not honour, are a BadRequestError naming them'() {
    const tools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object' } } }];
    const error = await expectError(BadRequestError, 400,
      () => client.chat.completions.create({ model, messages, max_tokens: 4, tools }));
    check(error.param === 'tools', `param ${error.param}`);
    check(error.code === 'unsupported_parameter', `code ${error.code}`);
  },

  async 'the defaults clients send are accepted'() {
    const completion = await client.chat.completions.create({
      model, messages, max_tokens: 4, n: 1, logprobs: false, presence_penalty: 0, frequency_penalty: 0,
      logit_bias: {}, user: 'user-1', response_format: { type: 'text' }, tools: null, top_logprobs: null,
    });
    check(completion.choices.length === 1 && completion.choices[0].message.content.length > 0,
      `completion ${JSON.stringify(completion)}`);
  },
};

if (apiKey) {
  checks['a wrong API key is an AuthenticationError'] = async () => {
    const stranger = new OpenAI({ baseURL, apiKey: `${apiKey}-wrong`, maxRetries: 0, timeout: 20_000 });
    await expectError(AuthenticationError, 401,
      () => stranger.chat.completions.create({ model, messages, max_tokens: 4 }));
  };
}

for (const [name, run] of Object.entries(checks)) {
  try {
    await run();
  } catch (error) {
    console.log(`FAILED ${name}: ${error?.stack ?? error}`);
    process.exit(1);
  }
  console.log(`ok ${name}`);
}
