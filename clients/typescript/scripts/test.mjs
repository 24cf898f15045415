// `npm test`: node's test runner on test/*.test.mjs (every test bounded by its own timeout, the run by 15 minutes).
// The client needs a WebSocket class: node >= 22 has one, node 20 behind --experimental-websocket; an older node
// (Debian bookworm's 18) gets the `ws` package, installed here without saving (the package itself depends on nothing).
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import path from "node:path";
import { PACKAGE } from "./python.mjs";

const flags = [];
if (typeof WebSocket === "undefined") {
  if (process.allowedNodeEnvironmentFlags.has("--experimental-websocket")) {
    flags.push("--experimental-websocket");
  } else {
    console.log(`node ${process.version} has no WebSocket: installing the ws package for the tests (not saved)`);
    const npm = spawnSync("npm", ["install", "--no-save", "--no-audit", "--no-fund", "ws@8"], { cwd: PACKAGE,
                                                                                               stdio: "inherit" });
    if (npm.status !== 0) process.exit(npm.status ?? 1);
    flags.push("--import", "./scripts/ws-global.mjs");
  }
}
const files = readdirSync(path.join(PACKAGE, "test")).filter((f) => f.endsWith(".test.mjs")).sort()
  .map((f) => path.join("test", f));
const r = spawnSync(process.execPath, [...flags, "--test", ...files], { cwd: PACKAGE, stdio: "inherit",
                                                                        timeout: 15 * 60 * 1000 });
process.exit(r.status ?? 1);
