#!/usr/bin/env node
// The guide's nodemailer usage, verbatim in shape: one transport, one sendMail, close.
// Usage: node send.js HOST PORT FROM TO SUBJECT TEXT
// Prints the info object as JSON on success; exits non-zero with the error on failure.
"use strict";

const nodemailer = require("nodemailer");

async function main(argv) {
  if (argv.length !== 6) {
    console.error("usage: node send.js HOST PORT FROM TO SUBJECT TEXT");
    return 2;
  }
  const [host, port, from, to, subject, text] = argv;
  const transporter = nodemailer.createTransport({
    host,
    port: Number(port),
    secure: false,
    tls: { rejectUnauthorized: false },
  });
  try {
    const info = await transporter.sendMail({ from, to, subject, text });
    console.log(JSON.stringify(info));
    return 0;
  } catch (err) {
    console.error(`send.js: ${err && err.message ? err.message : err}`);
    if (err && err.response) {
      console.error(`send.js: response: ${err.response}`);
    }
    return 1;
  } finally {
    transporter.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(`send.js: ${err}`);
    process.exit(1);
  },
);
