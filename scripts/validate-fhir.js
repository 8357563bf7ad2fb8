// Validates FHIR R4 resources with FHIR.js (npm `fhir`), an implementation independent of
// trialgate. Reads one resource, or a Bundle whose entry resources are each checked, on stdin;
// prints the messages; exits 1 if any resource is invalid. scripts/test installs the package.
const { Fhir } = require('fhir');
const fhir = new Fhir();
const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const resources = input.resourceType === 'Bundle' ? (input.entry || []).map((e) => e.resource).filter(Boolean) : [input];
let invalid = 0;
for (const r of resources) {
  const res = fhir.validate(r, { errorOnUnexpected: true });
  const errors = res.messages.filter((m) => m.severity === 'error');
  if (errors.length) {
    invalid += 1;
    console.log(`${r.resourceType}/${r.id || '(new)'}: ${JSON.stringify(errors)}`);
  }
}
console.log(`${resources.length - invalid} valid, ${invalid} invalid`);
process.exit(invalid ? 1 : 0);
