// Run the repository's Python (DPSLM_PYTHON, else the checkout's .venv, else python3) with the given arguments, from
// the repository root: `npm run generate` renders src/protocol.ts with it.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";

export const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = path.resolve(PACKAGE, "..", "..");

export function python() {
  if (process.env.DPSLM_PYTHON) return process.env.DPSLM_PYTHON;
  const venv = path.join(REPO, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2).map((a) => (a.startsWith("src/") ? path.join(PACKAGE, a) : a));
  const r = spawnSync(python(), args, { cwd: REPO, stdio: "inherit" });
  process.exit(r.status ?? 1);
}
