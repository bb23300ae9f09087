// Builds src/bank-account.js into a Meridian component with componentize-js.
//
//   node build.mjs [output]   (default: ../../target/wasm32-wasip2/release/bank_account_js.wasm,
//                              or under $CARGO_TARGET_DIR)
//
// componentize-js's JS API rather than the `jco componentize` CLI: the API is what the
// CLI calls underneath, and jco 1.35 brings preview2-shim 0.26, under which reading the
// WIT directory fails ("failed to get path metadata ... (os error 44)"). package.json
// pins preview2-shim 0.25.0 for componentize-js, which imports it without declaring it.
//
// `http` and `fetch-event` are disabled: they would import `wasi:http`, which Meridian
// does not serve. `stdio`, `random` and `clocks` stay: they import `wasi:cli`, `wasi:io`,
// `wasi:random` and `wasi:clocks`, which the host serves capability-free (stderr is kept
// to explain a trap, e.g. an uncaught exception; the clocks and random are fixed).
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { componentize } from '@bytecodealliance/componentize-js';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '../..');
const target = process.env.CARGO_TARGET_DIR ? resolve(process.env.CARGO_TARGET_DIR) : resolve(repo, 'target');
const output = resolve(process.argv[2] ?? resolve(target, 'wasm32-wasip2/release/bank_account_js.wasm'));

const { component } = await componentize({
  sourcePath: resolve(here, 'src/bank-account.js'),
  witPath: resolve(repo, 'guest-sdk/wit-0.1.0'),
  worldName: 'aggregate',
  disableFeatures: ['http', 'fetch-event'],
});
await mkdir(dirname(output), { recursive: true });
await writeFile(output, component);
console.log(`${output} (${component.length} bytes)`);
