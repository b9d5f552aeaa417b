// Validates Kubernetes custom resources against their CRD schemas (kubernetes-models).
// stdin: a JSON array of objects (tests/deploy/test_examples.py turns the YAML into it).
// Types, enums and required fields are checked; CRD schemas leave unknown fields to the API server's pruning.
import fs from "node:fs";

const MODELS = {
  "networking.istio.io": "@kubernetes-models/istio",
  "gateway.envoyproxy.io": "@kubernetes-models/envoy-gateway",
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
};
let failed = 0;
for (const doc of JSON.parse(fs.readFileSync(0, "utf8"))) {
  const [group, version] = doc.apiVersion.split("/");
  const models = await import(`${MODELS[group]}/${group}/${version}`);
  const name = `${doc.apiVersion} ${doc.kind} ${doc.metadata.name}`;
  try {
    new models[doc.kind](doc).validate();
    console.log(`valid ${name}`);
  } catch (err) {
    failed += 1;
    console.log(`invalid ${name}: ${err.message}`);
  }
}
process.exit(failed ? 1 : 0);
