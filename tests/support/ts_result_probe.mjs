// The TypeScript SDK client reading a scanned result through the gateway (tests/test_result_scan_e2e.py):
// node ts_result_probe.mjs <gateway server URL> <echo text> <resource URI>
// Prints one JSON line: what the client kept of the tools/call result and the resources/read answer.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, text, uri] = process.argv.slice(2);
const client = new Client({ name: "ts-result-probe", version: "1.0.0" });
await client.connect(new StreamableHTTPClientTransport(new URL(url)));
const out = {};
try {
  const called = await client.callTool({ name: "echo", arguments: { text } }, undefined, { timeout: 10000 });
  out.call = { texts: called.content.map((c) => c.text), isError: called.isError ?? false, meta: called._meta ?? null };
  const read = await client.readResource({ uri }, { timeout: 10000 });
  out.read = { texts: read.contents.map((c) => c.text), meta: read._meta ?? null };
} catch (e) {
  out.error = String((e && e.message) || e);
  out.code = e && e.code;
}
console.log(JSON.stringify(out));
await client.close();
process.exit(0);
