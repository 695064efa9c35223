// The E2B cookbook's basic code-interpreter flow with the official JS SDKs, unchanged: configured only by
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY. Prints one JSON object for tests/test_e2b_js.py to check.
import { Sandbox, CommandExitError, NotFoundError } from '@e2b/code-interpreter'
import http from 'node:http'

// a GET to the stockade server (E2B_SANDBOX_URL's host) naming a sandbox's port in the Host header, as a
// wildcard DNS name would reach it
function viaHost(host, headers) {
  const server = new URL(process.env.E2B_SANDBOX_URL)
  return new Promise((resolve, reject) => {
    const req = http.request({ host: server.hostname, port: server.port, path: '/?from=js', headers: { Host: host, ...headers } },
      (res) => { let body = ''; res.on('data', (d) => { body += d }); res.on('end', () => resolve({ status: res.statusCode, body })) })
    req.on('error', reject)
    req.end()
  })
}

const out = {}
const sbx = await Sandbox.create({ metadata: { from: 'js' } })
try {
  out.running = await sbx.isRunning()
  const streamed = []
  const r = await sbx.commands.run('echo one; echo two >&2', { onStdout: (d) => streamed.push(d) })
  out.command = { stdout: r.stdout, stderr: r.stderr, exitCode: r.exitCode, streamed: streamed.join('') }
  try {
    await sbx.commands.run('exit 3')
  } catch (e) {
    out.failed = { isCommandExit: e instanceof CommandExitError, exitCode: e.exitCode }
  }
  const bg = await sbx.commands.run('sleep 60', { background: true })
  out.killed = await bg.kill()
  await sbx.files.write('/home/user/js.txt', 'from js')
  out.read = await sbx.files.read('/home/user/js.txt')
  out.list = (await sbx.files.list('/home/user')).map((e) => e.name)
  out.exists = [await sbx.files.exists('/home/user/js.txt'), await sbx.files.exists('/home/user/nope')]
  await sbx.runCode('x = 20')
  const ex = await sbx.runCode('print("hi")\nx + 22')
  out.code = { text: ex.text, stdout: ex.logs.stdout }
  const err = await sbx.runCode('1/0')
  out.error = err.error && err.error.name
  const ctx = await sbx.createCodeContext({ language: 'bash' })
  out.bash = (await sbx.runCode('echo $((2+3))', { context: ctx })).logs.stdout
  out.listed = (await Sandbox.list({ query: { metadata: { from: 'js' } } }).nextItems()).map((s) => s.sandboxId)
  try {
    await sbx.commands.run('sleep 10', { timeoutMs: 1000 })
  } catch (e) {
    out.timeout = e.constructor.name
  }
  await sbx.files.makeDir('/home/user/jswatch')
  const seen = []
  const watcher = await sbx.files.watchDir('/home/user/jswatch', (ev) => seen.push([ev.name, ev.type]))
  await sbx.files.write('/home/user/jswatch/w.txt', 'w')
  for (let i = 0; i < 100 && seen.length === 0; i++) await new Promise((r) => setTimeout(r, 100))
  await watcher.stop()
  out.watched = seen
  await sbx.files.write([{ path: '/home/user/m1.txt', data: 'm1' }, { path: '/home/user/m2.txt', data: 'm2' }])
  out.multi = [await sbx.files.read('/home/user/m1.txt'), await sbx.files.read('/home/user/m2.txt')]
  const url = await sbx.downloadUrl('/home/user/m1.txt')
  out.signed = await (await fetch(url)).text()
  // a pty: E2B's bash -i -l on a terminal, typed into, resized, then killed
  const dec = new TextDecoder()
  let screen = ''
  const waitFor = async (text) => {
    for (let i = 0; i < 150 && !screen.includes(text); i++) await new Promise((r) => setTimeout(r, 100))
    return screen.includes(text)
  }
  const enc = new TextEncoder()
  const term = await sbx.pty.create({ cols: 80, rows: 24, timeoutMs: 0, onData: (d) => { screen += dec.decode(d) } })
  await sbx.pty.sendInput(term.pid, enc.encode("stty size; python3 -c 'import os; print(os.isatty(0))'\r"))
  out.ptyBefore = [await waitFor('24 80\r\n'), await waitFor('True\r\n')]
  await sbx.pty.resize(term.pid, { cols: 100, rows: 30 })
  await sbx.pty.sendInput(term.pid, enc.encode('stty size\r'))
  out.ptyResized = await waitFor('30 100\r\n')
  out.ptyKilled = await sbx.pty.kill(term.pid)
  try {
    await term.wait()
  } catch (e) {
    out.ptyEnd = { isCommandExit: e instanceof CommandExitError, exitCode: e.exitCode }
  }
  out.ptyKilledAgain = await sbx.pty.kill(term.pid)
  // getHost: a server inside on an exposed port, reached with the traffic token (and refused without it)
  await sbx.commands.run('python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1', { background: true })
  await sbx.commands.run('for i in $(seq 100); do python3 -c "import socket; socket.create_connection((\'127.0.0.1\', 8000))" 2>/dev/null && break; sleep 0.1; done')
  const host = sbx.getHost(8000)
  const withToken = await viaHost(host, { 'E2B-Traffic-Access-Token': sbx.trafficAccessToken })
  out.getHost = { host, status: withToken.status, listing: withToken.body.includes('Directory listing'),
                  withoutToken: (await viaHost(host, {})).status }
  out.id = sbx.sandboxId
} finally {
  await sbx.kill()
}
out.runningAfterKill = await sbx.isRunning()
try {
  await Sandbox.connect('sbx-0123456789abcdef')
} catch (e) {
  out.unknown = e.constructor.name
}
console.log(JSON.stringify(out))
