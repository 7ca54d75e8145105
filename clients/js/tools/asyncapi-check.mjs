// Validates an AsyncAPI document with the official parser; run by tests/test_asyncapi.py:
//   node tools/asyncapi-check.mjs ../../collab/asyncapi.json
// Prints every diagnostic; exits 1 when the parser finds an error or a warning.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const { document, diagnostics } = await new Parser().parse(readFileSync(process.argv[2], "utf8"));
// Spectral severities: 0 error, 1 warning, 2 information, 3 hint.
const serious = diagnostics.filter((d) => d.severity <= 1);
for (const d of diagnostics) console.log(d.severity, d.code, d.message, JSON.stringify(d.path));
if (!document || serious.length > 0) process.exit(1);
console.log(`valid: ${document.channels().length} channels, ${document.operations().length} operations, ${document.messages().length} messages`);
