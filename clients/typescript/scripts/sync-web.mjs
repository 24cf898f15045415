// The browser page (client/web/, served by the Python server as package data) runs on this package: copy the built
// ESM modules next to it. `npm test` (test/web-copy.test.mjs) checks that the committed copies equal a fresh build.
import { copyFileSync } from "node:fs";
import path from "node:path";
import { PACKAGE, REPO } from "./python.mjs";

export const WEB = path.join(REPO, "client", "web");
// index.js stays out: the page imports the modules it uses by name (an index.js beside index.html would confuse).
export const WEB_MODULES = ["protocol.js", "wire.js", "queue.js", "retained.js", "client.js", "capture.js",
                            "worklet.js"];

if (process.argv[1] && path.resolve(process.argv[1]) === path.join(PACKAGE, "scripts", "sync-web.mjs")) {
  for (const name of WEB_MODULES) copyFileSync(path.join(PACKAGE, "dist", name), path.join(WEB, name));
  console.log(`copied ${WEB_MODULES.length} modules to ${path.relative(process.cwd(), WEB)}`);
}
