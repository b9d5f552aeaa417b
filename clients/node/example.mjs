// A TuneDock client in Node.js, from protos/ alone: what a stack serves, upload a chat dataset,
// train a LoRA adapter on the stack's default base, watch the job, then generate with the adapter
// (unary and streaming) and show how errors arrive. docs/clients.md explains each step.
//
//   npm ci && node example.mjs
//
// Environment: TUNEDOCK_TRAINER_ADDRESS, TUNEDOCK_INFERENCE_ADDRESS (default 127.0.0.1:50051 and
// :50053), TUNEDOCK_TOKEN (a bearer token, when the stack has authentication on), and
// TUNEDOCK_EXAMPLE_OUTPUT (the registry name to train into; default node-example).
// Prints what it does, and a last line "RESULT {json}" that tests/clients/test_node_client.py reads.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.resolve(HERE, "../../protos");

// The options that matter. Without keepCase, proto-loader renames fields to camelCase and silently
// drops the snake_case ones you send (max_tokens, base_model). longs: String keeps int64 exact
// (JavaScript numbers are not); enums: String gives "JOB_STATE_SUCCEEDED" instead of 4; defaults
// fills unset fields; oneofs names the set member of a oneof; includeDirs resolves the protos'
// imports of each other (tunedock/v1/common.proto) and of google/protobuf.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTOS] };
const definition = protoLoader.loadSync(
  ["tunedock/v1/trainer.proto", "tunedock/v1/inference.proto"],
  LOADER_OPTIONS,
);
const v1 = grpc.loadPackageDefinition(definition).tunedock.v1;

const credentials = grpc.credentials.createInsecure(); // TLS: grpc.credentials.createSsl(ca, key, cert)
const trainer = new v1.TrainerService(process.env.TUNEDOCK_TRAINER_ADDRESS || "127.0.0.1:50051", credentials);
const inference = new v1.InferenceService(process.env.TUNEDOCK_INFERENCE_ADDRESS || "127.0.0.1:50053", credentials);
const output = process.env.TUNEDOCK_EXAMPLE_OUTPUT || "node-example";

// Metadata on every call: the bearer token ("Bearer " + token, nothing else), and for generation
// the adapter's name in x-tunedock-adapter, which a proxy in front of several replicas routes on.
function metadata(adapter = "") {
  const md = new grpc.Metadata();
  if (process.env.TUNEDOCK_TOKEN) md.set("authorization", `Bearer ${process.env.TUNEDOCK_TOKEN}`);
  if (adapter) md.set("x-tunedock-adapter", adapter.split(/[:@]/)[0]);
  return md;
}

function deadline(seconds) {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

// Unary calls as promises; errors keep their gRPC status (err.code, err.details).
function call(client, method, request, md = metadata(), seconds = 60) {
  return new Promise((resolve, reject) => {
    client[method](request, md, deadline(seconds), (err, response) => (err ? reject(err) : resolve(response)));
  });
}

const trainerInfo = await call(trainer, "GetTrainerInfo", {});
const inferenceInfo = await call(inference, "GetInferenceInfo", {});
console.log(`trainer ${trainerInfo.version}: default base ${trainerInfo.default_base_model}, ${trainerInfo.device}`);
console.log(`inference serves ${inferenceInfo.base_model} (${inferenceInfo.dtype}), LoRA rank <= ${inferenceInfo.max_lora_rank}`);

// Upload: a client stream, header first, then the file's bytes in chunks.
const records = [];
for (const thing of ["the moon", "gold", "the sea", "ships", "rum", "maps", "parrots", "storms"]) {
  records.push({
    messages: [
      { role: "user", content: `Tell me about ${thing}.` },
      { role: "assistant", content: `Arr, ${thing} be a fine treasure, matey!` },
    ],
  });
}
const data = Buffer.from(records.map((r) => JSON.stringify(r)).join("\n") + "\n");
const dataset = await new Promise((resolve, reject) => {
  const stream = trainer.UploadDataset(metadata(), deadline(120), (err, response) =>
    err ? reject(err) : resolve(response.dataset),
  );
  stream.write({ header: { name: "pirate-chat.jsonl", format: "DATASET_FORMAT_CHAT" } });
  for (let offset = 0; offset < data.length; offset += 1 << 20) stream.write({ data: data.subarray(offset, offset + (1 << 20)) });
  stream.end();
});
console.log(`uploaded ${dataset.id}: ${dataset.num_records} records, format ${dataset.format}`);

// Submit: no base_model, so the job trains on the trainer's default (the base inference serves).
// The method is a oneof inside MethodConfig: set exactly one member.
const submitted = await call(trainer, "SubmitJob", {
  spec: {
    method: { lora: { r: 4, alpha: 8, target_modules: ["q_proj", "v_proj"] } },
    train_dataset_ids: [dataset.id],
    output_name: output,
    hyperparameters: { max_steps: 12, learning_rate: 0.003, batch_size: 4, log_every_steps: 4 },
  },
});
const jobId = submitted.job.id;
console.log(`submitted ${jobId} (${submitted.job.state})`);

// Watch: a server stream of JobEvents; `event` names the oneof member that is set.
const events = [];
const states = [];
await new Promise((resolve, reject) => {
  const stream = trainer.WatchJob({ id: jobId }, metadata(), deadline(600));
  stream.on("data", ({ event }) => {
    events.push(event.event);
    if (event.event === "state") {
      states.push(event.state);
      console.log(`  ${event.state.state} ${event.state.message}`);
    }
    if (event.event === "progress") console.log(`  step ${event.progress.step}/${event.progress.total_steps} loss ${event.progress.loss.toFixed(3)}`);
    if (event.event === "published") console.log(`  published ${event.published.ref}`);
  });
  stream.on("error", reject);
  stream.on("end", resolve);
});
const { job } = await call(trainer, "GetJob", { id: jobId });
if (job.state !== "JOB_STATE_SUCCEEDED") throw new Error(`job ${jobId} ended ${job.state}: ${job.error}`);

// Generate with the adapter. It was trained on chat data, so send `messages` (the chat template
// is applied as in training), not a raw `prompt`.
const params = {
  messages: { messages: [{ role: "user", content: "Tell me about the moon." }] },
  adapter: job.output_ref,
  sampling: { max_tokens: 8 },
};
const unary = await call(inference, "GenerateUnary", { params }, metadata(job.output_ref));
console.log(`unary (${unary.adapter_version}): ${JSON.stringify(unary.completions[0].text)}`);

const streamed = [];
await new Promise((resolve, reject) => {
  const stream = inference.Generate({ params }, metadata(job.output_ref), deadline(60));
  stream.on("data", (delta) => streamed.push(delta));
  stream.on("error", reject);
  stream.on("end", resolve);
});
const streamedText = streamed.map((d) => d.text_delta).join("");
console.log(`streamed ${streamed.length} messages: ${JSON.stringify(streamedText)}`);

// Errors: a status code (grpc.status.NOT_FOUND is 5) and a message that says what to fix.
let error = null;
try {
  await call(inference, "GenerateUnary", { params: { ...params, adapter: `${output}-missing` } });
} catch (err) {
  error = { code: err.code, name: grpc.status[err.code], details: err.details };
  console.log(`as expected: ${error.name}: ${error.details}`);
}

const result = {
  default_base_model: trainerInfo.default_base_model,
  served_base: inferenceInfo.base_model,
  dataset: { id: dataset.id, num_records: dataset.num_records, format: dataset.format },
  job: { id: jobId, state: job.state, output_ref: job.output_ref, base_model: job.spec.base_model, step: job.step },
  events,
  states,
  unary: { text: unary.completions[0].text, token_ids: unary.completions[0].token_ids, adapter_version: unary.adapter_version },
  streamed: { text: streamedText, messages: streamed.length, finish_reason: streamed.at(-1).finish_reason },
  error,
};
console.log("RESULT " + JSON.stringify(result));
trainer.close();
inference.close();
