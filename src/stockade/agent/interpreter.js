// A JavaScript code-interpreter context (node), the twin of interpreter.py: JSON-line requests on stdin,
// console output on fds 1 and 2, JSON-line events on fd 3. Cells run in one global scope, so
// declarations persist between them; SIGINT interrupts a running cell and keeps the context.
'use strict';
const fs = require('fs');
const readline = require('readline');
const util = require('util');
const vm = require('vm');

const EVENTS = 3;
const emit = (event) => fs.writeSync(EVENTS, JSON.stringify(event) + '\n');
let count = 0;

process.on('SIGINT', () => {}); // between cells an interrupt does nothing; in a cell, breakOnSigint throws

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const request = JSON.parse(line);
  Object.assign(process.env, request.env || {});
  count += 1;
  try {
    const value = vm.runInThisContext(request.code, { filename: `<cell-${count}>`, breakOnSigint: true });
    if (value !== undefined) {
      emit({ type: 'result', main: true, data: { 'text/plain': util.inspect(value) } });
    }
  } catch (err) {
    const interrupted = err && err.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED';
    emit({
      type: 'error',
      name: interrupted ? 'KeyboardInterrupt' : String((err && err.name) || 'Error'),
      value: String(err && err.message !== undefined ? err.message : err),
      traceback: String((err && err.stack) || err),
    });
  }
  emit({ type: 'done', execution_count: count });
});
emit({ type: 'ready', backend: 'node', pid: process.pid });
