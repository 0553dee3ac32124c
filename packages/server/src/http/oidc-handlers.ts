/**
 * Handlers of the OIDC sign-in routes. They are browser redirects, not JSON calls: `oidcLogin`
 * sends the browser to the provider, `oidcCallback` takes it back and hands the token to the
 * waiting `devyard login` (a redirect to its loopback URL) or shows it once on a page. Errors are
 * an HTML page for browsers and problem+json for everyone else.
 */
import { DomainError } from '@devyard/core/domain-error';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { OidcLogin } from '../identity/oidc-login.js';
import type { HandlerContext, Handlers } from './create-app.js';
import { toProblem } from './problem-details.js';

const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title: string, body: string): string {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="referrer" content="no-referrer"><title>${escapeHtml(title)} · Devyard</title>
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:3rem auto;padding:0 1rem;color:#1d1d1f}
code,pre{font:14px ui-monospace,monospace;background:#f2f2f4;border-radius:4px}pre{padding:.75rem;white-space:pre-wrap;word-break:break-all}</style>
</head><body><h1>${escapeHtml(title)}</h1>${body}</body></html>
`;
}

function parseCookies(header: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of (header ?? '').split(';')) {
    const i = part.indexOf('=');
    if (i <= 0) continue;
    try {
      out[part.slice(0, i).trim()] = decodeURIComponent(part.slice(i + 1).trim());
    } catch {}
  }
  return out;
}

function setCookie(reply: FastifyReply, secure: boolean, name: string, value: string, maxAge: number): void {
  void reply.header('set-cookie', `${name}=${value}; Path=/; Max-Age=${maxAge}; HttpOnly; SameSite=Lax${secure ? '; Secure' : ''}`);
}

const wantsHtml = (req: FastifyRequest) => /text\/html/i.test(String(req.headers.accept ?? ''));

/** Answers an error as a page for browsers; rethrows it (problem+json) for API clients. */
function failed(ctx: HandlerContext, e: unknown): never | FastifyReply {
  if (!wantsHtml(ctx.req)) throw e;
  const p = toProblem(e);
  const hint = p.status < 500 ? '<p>Nothing was changed. Run <code>devyard login</code> again to start a new sign-in.</p>' : '<p>Try again in a moment.</p>';
  return ctx.reply
    .status(p.status)
    .header('cache-control', 'no-store')
    .type('text/html; charset=utf-8')
    .send(page('Sign-in failed', `<p>${escapeHtml(p.detail)}</p>${hint}`));
}

export function createOidcHandlers(oidc: OidcLogin | undefined): Pick<Handlers, 'oidcLogin' | 'oidcCallback' | 'redeemOidcLogin'> {
  const configured = () => {
    if (!oidc) throw new DomainError('not-found', 'single sign-on is not configured on this server (devyard server --oidc-issuer …); use an API token instead');
    return oidc;
  };
  const secure = () => !!oidc && oidc.redirectUri.startsWith('https:');
  return {
    oidcLogin: async (ctx) => {
      try {
        const start = await configured().start(ctx.query.cli as string | undefined, ctx.query.cli_challenge as string | undefined);
        setCookie(ctx.reply, secure(), start.cookie.name, start.cookie.value, start.cookie.maxAgeSeconds);
        return ctx.reply.header('cache-control', 'no-store').redirect(start.authorizationUrl, 302);
      } catch (e) {
        return failed(ctx, e);
      }
    },
    oidcCallback: async (ctx) => {
      try {
        const query = new URLSearchParams(ctx.req.url.split('?')[1] ?? '');
        const r = await configured().callback(query, parseCookies(ctx.req.headers.cookie), { requestId: String(ctx.req.id), source: ctx.req.ip });
        setCookie(ctx.reply, secure(), r.cookieName, '', 0);
        void ctx.reply.header('cache-control', 'no-store').header('referrer-policy', 'no-referrer');
        if (r.cli) {
          // Only a one-time code reaches the loopback URL; the CLI redeems it with its verifier.
          const to = new URL(r.cli.url);
          to.searchParams.set('code', r.cli.code);
          to.searchParams.set('user', r.user);
          return ctx.reply.redirect(to.href, 302);
        }
        const server = oidc!.serverUrl;
        return ctx.reply
          .status(200)
          .type('text/html; charset=utf-8')
          .send(
            page(
              `Signed in as ${r.user}`,
              `<p>${r.firstLogin ? 'Welcome to Devyard: your account was created. ' : ''}This is your login token. It is shown only once and expires at ${escapeHtml(new Date(r.expiresAt).toISOString())}.</p>
<pre>${escapeHtml(r.token)}</pre>
<p>Configure the CLI with it:</p>
<pre>devyard login --server ${escapeHtml(server)} --token ${escapeHtml(r.token)}</pre>
<p>or set <code>DEVYARD_URL=${escapeHtml(server)}</code> and <code>DEVYARD_TOKEN</code>. You can close this tab afterwards.</p>`,
            ),
          );
      } catch (e) {
        return failed(ctx, e);
      }
    },
    redeemOidcLogin: async (ctx) => {
      const body = ctx.body as { code: string; verifier: string };
      const r = await configured().redeem(body.code, body.verifier, { requestId: String(ctx.req.id), source: ctx.req.ip });
      void ctx.reply.header('cache-control', 'no-store');
      return { token: r.token, user: r.user, expiresAt: new Date(r.expiresAt).toISOString() };
    },
  };
}
