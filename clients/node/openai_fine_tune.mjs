// Fine-tune with the stock `openai` npm package against TuneDock, then chat with the result (docs/clients.md).
//
//   TUNEDOCK_OPENAI_BASE_URL=http://127.0.0.1:8000/v1 TUNEDOCK_TOKEN=... node openai_fine_tune.mjs data.jsonl
//
// Uploads the file, creates a LoRA job (method.type "lora": one of TuneDock's four methods, passed
// through by the SDK), follows its events until it ends, and asks `fine_tuned_model` one question.
// Prints one JSON line: the job's status, fine_tuned_model, the steps its metrics events reported,
// and the chat reply's model and completion tokens.
import fs from "node:fs";
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.TUNEDOCK_OPENAI_BASE_URL ?? "http://127.0.0.1:8000/v1",
  apiKey: process.env.TUNEDOCK_TOKEN ?? "none",
  maxRetries: 0,
});
const path = process.argv[2];
const maxSteps = Number(process.env.TUNEDOCK_MAX_STEPS ?? 20);

const file = await client.files.create({ file: fs.createReadStream(path), purpose: "fine-tune" });
let job = await client.fineTuning.jobs.create({
  model: "auto",
  training_file: file.id,
  method: { type: "lora", lora: { r: 4, hyperparameters: { max_steps: maxSteps, batch_size: 4 } } },
});
const terminal = new Set(["succeeded", "failed", "cancelled"]);
while (!terminal.has(job.status)) {
  await new Promise((resolve) => setTimeout(resolve, 500));
  job = await client.fineTuning.jobs.retrieve(job.id);
}
const steps = [];
for await (const event of client.fineTuning.jobs.listEvents(job.id, { limit: 50 })) {
  if (event.type === "metrics" && event.data?.train_loss !== undefined) steps.push(event.data.step);
}
steps.reverse(); // events come newest first
const result = { status: job.status, fine_tuned_model: job.fine_tuned_model, error: job.error, steps };
if (job.status === "succeeded") {
  const reply = await client.chat.completions.create({
    model: job.fine_tuned_model,
    messages: [{ role: "user", content: "What does the pirate say about ship 3?" }],
    max_tokens: 6,
    temperature: 0,
  });
  result.reply_model = reply.model;
  result.completion_tokens = reply.usage.completion_tokens;
}
console.log(JSON.stringify(result));
