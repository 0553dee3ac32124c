/** Handlers of the secrets routes. Every answer is metadata: no handler ever returns a value. */
import type { PutSecretRequest } from '@devyard/api/secret-schemas';
import type { SecretService } from '../secrets/secret-service.js';
import type { HandlerContext } from './create-app.js';

export function createSecretHandlers(secrets: SecretService) {
  return {
    putSecret: async (ctx: HandlerContext) => {
      const { secret, created } = await secrets.put(ctx.subject, ctx.params.scope!, ctx.params.name!, (ctx.body as PutSecretRequest).value);
      // The route's status is 200 (replaced); a new secret answers 201 with its location.
      if (!created) return secret;
      void ctx.reply.header('location', `/v1/secrets/${encodeURIComponent(ctx.params.scope!)}/${ctx.params.name!}`);
      return ctx.reply.status(201).send(secret);
    },
    listSecrets: async (ctx: HandlerContext) => ({ items: await secrets.list(ctx.subject) }),
    deleteSecret: async (ctx: HandlerContext) => {
      await secrets.delete(ctx.subject, ctx.params.scope!, ctx.params.name!);
      return undefined;
    },
  };
}
