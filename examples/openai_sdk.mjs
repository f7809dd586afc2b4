// examples/openai_sdk: OpenAI's official Node SDK against `fmwire up` (the
// gateway, a router and workers with the built-in model on one machine):
// a streamed chat completion, as any OpenAI application makes it.
//
// Run: fmwire up --port 8080 &
//      npm ci --prefix tests/system/node    # the pinned `openai` package
//      node examples/openai_sdk.mjs http://127.0.0.1:8080/v1
import { createRequire } from 'node:module';

// The openai package from tests/system/node (or wherever NODE_PATH says).
const require = createRequire(new URL('../tests/system/node/package.json', import.meta.url));
const { OpenAI } = require('openai');

const baseURL = process.argv[2] ?? 'http://127.0.0.1:8080/v1';
const client = new OpenAI({ baseURL, apiKey: process.env.OPENAI_API_KEY ?? 'no-key-needed', maxRetries: 0 });

const stream = await client.chat.completions.create({
  model: 'builtin',
  messages: [{ role: 'user', content: 'Once upon a time' }],
  max_tokens: 32,
  stream: true,
});
let text = '';
let finishReason = null;
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? '';
  finishReason = chunk.choices[0]?.finish_reason ?? finishReason;
}
console.log(`${text}\n[${finishReason}]`);
if (!text || !finishReason) process.exit(1);
