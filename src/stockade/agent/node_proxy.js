'use strict';
// Preloaded into every node process in a sandbox with a network (NODE_OPTIONS=--require ...).
// node's fetch (undici) ignores HTTP_PROXY/HTTPS_PROXY before node 24; this routes it through the
// sandbox's egress proxy: https origins through CONNECT (the broker checks the name and the TLS SNI;
// TLS stays end to end, or is intercepted for secret-bound hosts, whose CA node trusts through
// NODE_EXTRA_CA_CERTS), http origins through SOCKS5. The broker enforces the policy either way: this file
// only makes fetch find it, and nothing here is trusted.
(function () {
  const sym = Symbol.for('undici.globalDispatcher.1');
  const connectProxy = process.env.HTTPS_PROXY || process.env.https_proxy;
  const socksProxy = process.env.ALL_PROXY || process.env.all_proxy;
  if (!connectProxy || !socksProxy || typeof fetch !== 'function') return;
  if (!globalThis[sym]) {
    // node makes its dispatcher on the first fetch; a fetch to a closed local port makes it now
    fetch('http://127.0.0.1:0/').catch(() => {});
  }
  const Agent = globalThis[sym] && globalThis[sym].constructor;
  if (typeof Agent !== 'function') return;
  const net = require('net');
  const tls = require('tls');
  const http = new URL(connectProxy);
  const socks = new URL(socksProxy);
  const local = new Set(['localhost', '127.0.0.1', '::1']);

  function readUntil(sock, done, test) {
    let buf = Buffer.alloc(0);
    const onData = (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      const n = test(buf);
      if (n < 0) return;
      sock.removeListener('data', onData);
      if (buf.length > n) sock.unshift(buf.subarray(n));
      done(buf.subarray(0, n));
    };
    sock.on('data', onData);
  }

  function viaConnect(host, port, cb) {
    const sock = net.connect(Number(http.port), http.hostname);
    sock.once('error', cb);
    sock.once('connect', () => sock.write(`CONNECT ${host}:${port} HTTP/1.1\r\nHost: ${host}:${port}\r\n\r\n`));
    readUntil(sock, (head) => {
      const text = head.toString('latin1');
      if (/^HTTP\/1\.[01] 200/.test(text)) return cb(null, sock);
      // a refusal's body says what was denied and which policy field would allow it
      let body = '';
      sock.on('data', (d) => { body += d.toString('utf8'); });
      sock.on('end', () => cb(new Error(`proxy refused ${host}:${port}: ${text.split('\r\n')[0]} ${body.trim()}`)));
    }, (buf) => { const i = buf.indexOf('\r\n\r\n'); return i < 0 ? (buf.length > 65536 ? 0 : -1) : i + 4; });
  }

  function viaSocks(host, port, cb) {
    const sock = net.connect(Number(socks.port), socks.hostname);
    sock.once('error', cb);
    sock.once('connect', () => sock.write(Buffer.from([5, 1, 0])));
    readUntil(sock, () => {
      const name = Buffer.from(host);
      sock.write(Buffer.concat([Buffer.from([5, 1, 0, 3, name.length]), name, Buffer.from([port >> 8, port & 255])]));
      readUntil(sock, (reply) => {
        if (reply[1] === 0) return cb(null, sock);
        sock.destroy();
        cb(new Error(`proxy refused ${host}:${port} (SOCKS reply ${reply[1]})`));
      }, (buf) => (buf.length >= 10 ? 10 : -1));
    }, (buf) => (buf.length >= 2 ? 2 : -1));
  }

  function connect(opts, cb) {
    const secure = opts.protocol === 'https:';
    const host = String(opts.hostname).replace(/^\[|\]$/g, '');
    const port = Number(opts.port) || (secure ? 443 : 80);
    const wrap = (err, sock) => {
      if (err) return cb(err);
      if (!secure) return cb(null, sock);
      const t = tls.connect({ socket: sock, servername: opts.servername || host, ALPNProtocols: ['http/1.1'] });
      t.once('secureConnect', () => cb(null, t));
      t.once('error', cb);
    };
    if (local.has(host)) {
      const sock = net.connect(port, host);
      sock.once('connect', () => wrap(null, sock));
      sock.once('error', cb);
    } else if (secure) {
      viaConnect(host, port, wrap);
    } else {
      viaSocks(host, port, wrap);
    }
  }

  globalThis[sym] = new Agent({ connect });
})();
