// The official TypeScript MCP SDK client, as a line protocol for the Python tests
// (tests/support/ts_client.py, tests/integration/test_ts_sdk.py).
//
//   node tests/ts/client.mjs http://127.0.0.1:PORT/mcp [--no-keepalive]
//
// --no-keepalive: every request says `Connection: close`, so each goes on a new connection
// (behind a connection-level balancer, each request may reach another server).
//
// It connects with the SDK's StreamableHTTPClientTransport and Client, then obeys commands read
// from stdin, one JSON object a line:
//   {"op": "call", "tag": T, "tool": NAME, "args": {...}}  call a tool (progress requested);
//                                                          calls run concurrently
//   {"op": "close"}                                         close the client and exit 0
// (end of stdin closes too). It reports on stdout, one JSON object a line, each with "event":
//   connected     {session, protocol}                    once, after the initialize handshake
//   progress      {tag, progress, total, message}        a progress notification of call T
//   result        {tag, text, is_error}                  call T's result (its text content)
//   error         {tag, message, code}                   call T failed
//   notification  {method, params}                       any other server notification: those
//                                                        unrelated to a call arrive on the GET stream
//   get           {status, last_event_id}                the transport opened (or tried to
//                                                        reopen) its GET stream; status 0: no answer
//   transport_error {message}                            the transport reported an error
//   bad_command   {line}                                 a line it did not understand
//   closed        {}                                     the client closed
//
// Only plain ESM against the SDK's published dist/: no build step.

import { createInterface } from 'node:readline';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const url = process.argv[2];
const noKeepalive = process.argv.slice(3).includes('--no-keepalive');
if (!url) {
    process.stderr.write('usage: node client.mjs URL\n');
    process.exit(2);
}

function report(event, fields = {}) {
    // Writes to a pipe are synchronous on Linux, so lines are never interleaved or lost on exit.
    process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

// Every GET the transport makes, with its answer: how the test sees the standalone stream being
// opened and resumed (Last-Event-ID) across a sidecar's death.
async function observedFetch(input, init) {
    if (noKeepalive) {
        // Node's fetch (undici) honours it: the connection is closed after the response.
        const headers = new Headers(init?.headers);
        headers.set('connection', 'close');
        init = { ...init, headers };
    }
    const method = init?.method ?? 'GET';
    if (method !== 'GET') {
        return fetch(input, init);
    }
    const lastEventId = new Headers(init?.headers).get('last-event-id');
    try {
        const response = await fetch(input, init);
        report('get', { status: response.status, last_event_id: lastEventId });
        return response;
    } catch (error) {
        report('get', { status: 0, last_event_id: lastEventId, message: String(error) });
        throw error;
    }
}

// The SDK's defaults (1 s, growing, 2 retries) give up before a replacement sidecar is up. When
// the server sends `retry:` the transport waits exactly that long between attempts and these
// delays are unused; maxRetries counts failed attempts in a row either way: 120 retries at the
// test sidecar's `retry: 250` is 30 s, at most 1 s apart otherwise.
const reconnectionOptions = {
    initialReconnectionDelay: 100,
    maxReconnectionDelay: 1000,
    reconnectionDelayGrowFactor: 1.5,
    maxRetries: 120,
};

const transport = new StreamableHTTPClientTransport(new URL(url), {
    reconnectionOptions,
    fetch: observedFetch,
});
const client = new Client({ name: 'tether-ts-test-client', version: '1.0.0' }, { capabilities: {} });
client.onerror = error => report('transport_error', { message: String(error?.message ?? error) });
// Progress notifications go to each call's onprogress; every other notification lands here.
client.fallbackNotificationHandler = async notification => {
    report('notification', { method: notification.method, params: notification.params ?? {} });
};

const CALL_TIMEOUT_MS = 120_000;

async function call(tag, tool, args) {
    try {
        const result = await client.callTool({ name: tool, arguments: args }, undefined, {
            onprogress: p => report('progress', { tag, progress: p.progress, total: p.total, message: p.message }),
            timeout: CALL_TIMEOUT_MS,
            resetTimeoutOnProgress: true,
        });
        const text = (result.content ?? []).filter(c => c.type === 'text').map(c => c.text).join('');
        report('result', { tag, text, is_error: result.isError === true });
    } catch (error) {
        // `cause`: what undici says under its "fetch failed" (a reset, a refused connection...).
        report('error', {
            tag,
            message: String(error?.message ?? error),
            code: error?.code ?? null,
            cause: error?.cause ? String(error.cause?.code ?? error.cause?.message ?? error.cause) : null,
        });
    }
}

let closing = false;
async function close() {
    if (closing) {
        return;
    }
    closing = true;
    await client.close();
    report('closed');
    process.exit(0);
}

await client.connect(transport);
report('connected', { session: transport.sessionId ?? null, protocol: transport.protocolVersion ?? null });

const lines = createInterface({ input: process.stdin });
lines.on('line', line => {
    if (!line.trim()) {
        return;
    }
    const command = JSON.parse(line);
    if (command.op === 'call') {
        void call(command.tag, command.tool, command.args ?? {});
    } else if (command.op === 'close') {
        void close();
    } else {
        report('bad_command', { line });
    }
});
lines.on('close', () => void close());
