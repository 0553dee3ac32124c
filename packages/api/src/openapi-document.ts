/** Generates the OpenAPI 3.1 document from the route table and its zod schemas. */
import { z } from 'zod';
import { ProblemSchema } from './common-schemas.js';
import { ROUTES, type RouteDef } from './routes.js';

type Json = Record<string, unknown>;

/** Named schemas (those with a `meta({ id })`) become components and are referenced by $ref. */
function toSchema(schema: z.ZodType, io: 'input' | 'output', components: Record<string, unknown>): Json {
  const raw = z.toJSONSchema(schema, { io, target: 'draft-2020-12', unrepresentable: 'any', reused: 'inline' });
  // zod puts named sub-schemas under $defs; OpenAPI keeps them under components.
  const json = JSON.parse(JSON.stringify(raw).replaceAll('"#/$defs/', '"#/components/schemas/')) as Json & { $defs?: Record<string, unknown> };
  const { $defs, $schema: _s, id: _id, ...rest } = json;
  Object.assign(components, $defs ?? {});
  const id = (z.globalRegistry.get(schema) as { id?: string } | undefined)?.id;
  if (id) {
    // zod answers a named root either inline or as a $ref into $defs (already merged above).
    if (!('$ref' in rest)) components[id] = rest;
    return { $ref: `#/components/schemas/${id}` };
  }
  return rest;
}

function parameters(route: RouteDef, components: Record<string, unknown>): Json[] {
  const out: Json[] = [];
  const add = (obj: z.ZodObject | undefined, where: 'path' | 'query') => {
    if (!obj) return;
    for (const [name, s] of Object.entries(obj.shape)) {
      const schema = s as z.ZodType;
      out.push({ name, in: where, required: where === 'path' || !schema.safeParse(undefined).success, schema: toSchema(schema, 'input', components) });
    }
  };
  add(route.params, 'path');
  add(route.query, 'query');
  for (const h of route.headers ?? []) out.push({ name: h.name, in: 'header', required: false, description: h.description, schema: { type: 'string' } });
  return out;
}

export function buildOpenApiDocument(serverUrl?: string): Json {
  const components: Record<string, unknown> = {};
  const paths: Record<string, Record<string, unknown>> = {};
  const problemRef = toSchema(ProblemSchema, 'output', components);
  for (const route of ROUTES as readonly RouteDef[]) {
    const responses: Record<string, unknown> = {};
    const content: Json = {};
    if (route.response) content['application/json'] = { schema: toSchema(route.response, 'output', components) };
    if (route.sse) content['text/event-stream'] = { schema: { type: 'string', description: 'Server-Sent Events; each `data:` line is one JSON object' } };
    responses[String(route.status)] = { description: 'success', ...(Object.keys(content).length ? { content } : {}) };
    const errorContent: Json = { 'application/problem+json': { schema: problemRef } };
    if (route.htmlErrors) errorContent['text/html'] = { schema: { type: 'string', description: 'for browsers (Accept: text/html): a page saying what went wrong' } };
    responses.default = { description: 'error', content: errorContent };
    const op: Json = {
      operationId: route.operationId,
      summary: route.summary,
      tags: [route.tag],
      parameters: parameters(route, components),
      responses,
    };
    if (route.auth !== 'none') op.security = [{ bearer: [] }];
    if (route.body) op.requestBody = { required: true, content: { 'application/json': { schema: toSchema(route.body, 'input', components) } } };
    (paths[route.path] ??= {})[route.method.toLowerCase()] = op;
  }
  return {
    openapi: '3.1.0',
    info: { title: 'Devyard API', version: '1', description: 'Self-hostable cloud DevBoxes. Errors are application/problem+json.' },
    ...(serverUrl ? { servers: [{ url: serverUrl }] } : {}),
    paths,
    components: { schemas: components, securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
  };
}
