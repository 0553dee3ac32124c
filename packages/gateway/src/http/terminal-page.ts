/**
 * The browser terminal: one HTML page with xterm.js that speaks the exec protocol
 * (`@devyard/api/exec-protocol`) with the gateway over a WebSocket: binary frames with a channel
 * byte for bytes, JSON text frames for resize and exit. The page carries the CSRF token the
 * WebSocket must present besides the cookie, which only a page of the gateway's origin can read.
 */
const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

export function terminalPage(box: string, csrf: string, subject: string): string {
  const name = escapeHtml(box);
  // Whose session this is, in plain sight: a link someone else sent signs the browser in as them.
  const who = escapeHtml(subject);
  // JSON of base64url text: nothing in it can close the script element.
  const config = JSON.stringify({ csrf });
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>${name} — Devyard terminal</title>
<link rel="stylesheet" href="/__devyard/assets/xterm.css">
<style>
  html, body { margin: 0; height: 100%; background: #1e1e1e; color: #ddd; font-family: system-ui, sans-serif; }
  #bar { height: 28px; line-height: 28px; padding: 0 10px; font-size: 13px; background: #2d2d2d; }
  #term { position: absolute; top: 28px; bottom: 0; left: 0; right: 0; }
</style>
</head>
<body>
<div id="bar">${name} · signed in as <span id="subject">${who}</span> · <span id="status">connecting…</span></div>
<div id="term"></div>
<script src="/__devyard/assets/xterm.js"></script>
<script src="/__devyard/assets/addon-fit.js"></script>
<script>
(() => {
  const config = ${config};
  const term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById('term'));
  fit.fit();
  const status = document.getElementById('status');
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(proto + '//' + location.host + location.pathname.replace(/\\/$/, '') + '/ws?cols=' + term.cols + '&rows=' + term.rows + '&csrf=' + encodeURIComponent(config.csrf));
  ws.binaryType = 'arraybuffer';
  const enc = new TextEncoder();
  ws.onopen = () => { status.textContent = 'connected'; term.focus(); };
  ws.onmessage = (ev) => {
    if (typeof ev.data === 'string') {
      const msg = JSON.parse(ev.data);
      if (msg.type === 'exit') { status.textContent = 'exited (' + msg.code + ')'; term.write('\\r\\n[process exited with code ' + msg.code + ']\\r\\n'); }
      if (msg.type === 'error') { status.textContent = 'error'; term.write('\\r\\n' + msg.message + '\\r\\n'); }
      return;
    }
    const bytes = new Uint8Array(ev.data);
    term.write(bytes.subarray(1));
  };
  ws.onclose = () => { if (status.textContent === 'connected') status.textContent = 'disconnected'; };
  term.onData((d) => {
    if (ws.readyState !== 1) return;
    const body = enc.encode(d);
    const frame = new Uint8Array(body.length + 1);
    frame[0] = 0;
    frame.set(body, 1);
    ws.send(frame);
  });
  term.onResize(({ cols, rows }) => ws.readyState === 1 && ws.send(JSON.stringify({ type: 'resize', cols, rows })));
  window.addEventListener('resize', () => fit.fit());
})();
</script>
</body>
</html>
`;
}

/** What an unauthenticated browser sees, with what went wrong when there is more to say. */
export function signInPage(problem?: string): string {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in — Devyard</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40em; margin: 4em auto">
<h1>Sign in to Devyard</h1>
${problem ? `<p><strong>${escapeHtml(problem)}</strong></p>\n` : ''}<p>This page belongs to a Devyard box. Open it with a sign-in link from the command line (each link works once, within a minute):</p>
<pre>devyard open BOX            # browser terminal
devyard open BOX --port N   # a port's preview</pre>
</body></html>
`;
}
