// Chat with a TuneDock adapter through the stock `openai` npm package, streamed (docs/clients.md).
//
//   TUNEDOCK_OPENAI_BASE_URL=http://127.0.0.1:8000/v1 TUNEDOCK_TOKEN=... node openai_chat.mjs pirate@prod
//
// The adapter is the `model` ("name", "name:3", "name@alias"; the base's id for the base model),
// the api key is a TuneDock token. Prints one JSON line: the text, the number of chunks, the finish
// reason and the usage the last chunk carries.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.TUNEDOCK_OPENAI_BASE_URL ?? "http://127.0.0.1:8000/v1",
  apiKey: process.env.TUNEDOCK_TOKEN ?? "none",
  maxRetries: 0,
});
const model = process.argv[2];
const maxTokens = Number(process.env.TUNEDOCK_MAX_TOKENS ?? 16);

try {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "What does the pirate say about ship 3?" }],
    max_tokens: maxTokens,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let chunks = 0;
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    chunks += 1;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      text += choice.delta?.content ?? "";
      finish = choice.finish_reason ?? finish;
    }
  }
  console.log(JSON.stringify({ model, text, chunks, finish, usage }));
} catch (err) {
  // The SDK's typed errors: NotFoundError, AuthenticationError, BadRequestError...
  console.log(JSON.stringify({ model, error: { name: err.constructor.name, status: err.status, message: err.message } }));
}
