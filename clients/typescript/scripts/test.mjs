// `npm test`: node's test runner on test/*.test.mjs, with the WebSocket class node 20 keeps behind a flag (node >= 22
// has it by default) and a bound on every test file.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import path from "node:path";
import { PACKAGE } from "./python.mjs";

const major = Number(process.versions.node.split(".")[0]);
const flags = typeof WebSocket === "undefined" && major >= 20 ? ["--experimental-websocket"] : [];
const files = readdirSync(path.join(PACKAGE, "test")).filter((f) => f.endsWith(".test.mjs")).sort()
  .map((f) => path.join("test", f));
const r = spawnSync(process.execPath, [...flags, "--test", ...files], { cwd: PACKAGE, stdio: "inherit",
                                                                        timeout: 15 * 60 * 1000 });
process.exit(r.status ?? 1);
