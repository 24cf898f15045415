// The page (client/web) runs on committed copies of this package's built modules: they must equal a fresh build
// (`npm test` builds first), so the page cannot drift from the package. Fix: `npm run sync-web`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { PACKAGE } from "../scripts/python.mjs";
import { WEB, WEB_MODULES } from "../scripts/sync-web.mjs";

test("client/web holds the fresh build of every module the page loads", () => {
  for (const name of WEB_MODULES) {
    const built = readFileSync(path.join(PACKAGE, "dist", name), "utf8");
    const copy = readFileSync(path.join(WEB, name), "utf8");
    assert.ok(copy === built, `client/web/${name} differs from dist/${name}: run \`npm run sync-web\``);
  }
  const app = readFileSync(path.join(WEB, "app.js"), "utf8");
  for (const [, module] of app.matchAll(/from "\.\/(\w+\.js)"/g)) assert.ok(WEB_MODULES.includes(module), module);
});
