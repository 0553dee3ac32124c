/**
 * The route table: every HTTP route of the server with its schemas. The server registers its
 * handlers from this table, the OpenAPI document is generated from it, and the SDK's types come from
 * the same schemas, so the three cannot drift apart.
 */
import { z } from 'zod';
import { NameSchema } from './common-schemas.js';
import {
  BoxEventListSchema,
  BoxListSchema,
  BoxSchema,
  CreateBoxRequestSchema,
  ExecSessionRequestSchema,
  ExecSessionSchema,
} from './box-schemas.js';
import { CreateTemplateRequestSchema, PrebuildListSchema, TemplateListSchema, TemplateSchema } from './template-schemas.js';
import {
  DesiredSetSchema,
  HeartbeatRequestSchema,
  NodeListSchema,
  NodeSchema,
  RegisterNodeRequestSchema,
  RegisterNodeResponseSchema,
  StatusReportRequestSchema,
} from './node-schemas.js';
import {
  AccessTokenSchema,
  AddSshKeyRequestSchema,
  BoxConnectionSchema,
  BoxPortListSchema,
  BoxPortSchema,
  CreateAccessTokenRequestSchema,
  PortParamSchema,
  SetBoxPortRequestSchema,
  SshKeyListSchema,
  SshKeySchema,
} from './access-schemas.js';
import { GatewaySyncRequestSchema, RouteTableSchema, WakeBoxRequestSchema } from './gateway-schemas.js';

export interface RouteDef {
  operationId: string;
  method: 'GET' | 'POST' | 'DELETE' | 'PUT' | 'PATCH';
  /** OpenAPI-style path with `{param}` placeholders. */
  path: string;
  summary: string;
  tag: string;
  /** Who may call it: anyone, a user token, a node agent token or a gateway token. */
  auth: 'none' | 'user' | 'node' | 'gateway';
  params?: z.ZodObject;
  query?: z.ZodObject;
  body?: z.ZodType;
  /** Request headers the route honours (documented in OpenAPI). */
  headers?: Array<{ name: string; description: string }>;
  status: number;
  response?: z.ZodType;
  /** Whether `?watch=1` turns the response into a Server-Sent Events stream. */
  sse?: boolean;
}

const boxName = z.object({ name: NameSchema });
const anyName = z.object({ name: z.string().min(1).max(63) });
const nodeId = z.object({ id: z.string().min(1).max(64) });
const boxId = z.object({ id: z.string().min(1).max(64) });
const boxPort = z.object({ name: NameSchema, port: PortParamSchema });
const keyId = z.object({ id: z.string().min(1).max(64) });
const watchQuery = z.object({ watch: z.enum(['0', '1', 'true', 'false']).optional().meta({ description: '1: stream changes as Server-Sent Events' }) });
const ifMatch = { name: 'If-Match', description: 'ETag of the box; the update is refused with 412 if the box changed since' };

const verb = (v: 'start' | 'stop' | 'pause' | 'resume', summary: string): RouteDef => ({
  operationId: `${v}Box`,
  method: 'POST',
  path: `/v1/boxes/{name}/${v}`,
  summary,
  tag: 'boxes',
  auth: 'user',
  params: boxName,
  headers: [ifMatch],
  status: 202,
  response: BoxSchema,
});

export const ROUTES = [
  { operationId: 'healthz', method: 'GET', path: '/healthz', summary: 'Liveness and store health', tag: 'system', auth: 'none', status: 200, response: z.object({ status: z.literal('ok') }) },
  { operationId: 'openapi', method: 'GET', path: '/v1/openapi.json', summary: 'This OpenAPI document', tag: 'system', auth: 'none', status: 200 },
  {
    operationId: 'createBox',
    method: 'POST',
    path: '/v1/boxes',
    summary: 'Create a box (asynchronous: returns at once, the box then converges to running)',
    tag: 'boxes',
    auth: 'user',
    body: CreateBoxRequestSchema,
    headers: [{ name: 'Idempotency-Key', description: 'same key and body return the same box; the same key with another body is a 409' }],
    status: 202,
    response: BoxSchema,
  },
  { operationId: 'listBoxes', method: 'GET', path: '/v1/boxes', summary: 'List boxes, or watch them with ?watch=1 (SSE)', tag: 'boxes', auth: 'user', query: watchQuery, status: 200, response: BoxListSchema, sse: true },
  { operationId: 'getBox', method: 'GET', path: '/v1/boxes/{name}', summary: 'Get a box (with its ETag)', tag: 'boxes', auth: 'user', params: boxName, status: 200, response: BoxSchema },
  verb('start', 'Start a stopped box (cold boot)'),
  verb('stop', 'Stop a box: end all processes, release CPU and memory, keep the disk'),
  verb('pause', 'Pause a running box: freeze its processes in place'),
  verb('resume', 'Resume a paused box'),
  { operationId: 'deleteBox', method: 'DELETE', path: '/v1/boxes/{name}', summary: 'Delete a box and everything of it on its node', tag: 'boxes', auth: 'user', params: boxName, headers: [ifMatch], status: 202, response: BoxSchema },
  {
    operationId: 'listBoxEvents',
    method: 'GET',
    path: '/v1/boxes/{name}/events',
    summary: "A box's event timeline (?watch=1 streams new events)",
    tag: 'boxes',
    auth: 'user',
    params: boxName,
    query: watchQuery,
    status: 200,
    response: BoxEventListSchema,
    sse: true,
  },
  { operationId: 'createExecSession', method: 'POST', path: '/v1/boxes/{name}/exec-sessions', summary: 'Authorize a command session in a running box', tag: 'boxes', auth: 'user', params: boxName, body: ExecSessionRequestSchema, status: 201, response: ExecSessionSchema },
  { operationId: 'getBoxConnection', method: 'GET', path: '/v1/boxes/{name}/connection', summary: "How to reach a box over SSH: its host key, alias and a gateway", tag: 'access', auth: 'user', params: boxName, status: 200, response: BoxConnectionSchema },
  { operationId: 'listBoxPorts', method: 'GET', path: '/v1/boxes/{name}/ports', summary: "The box's ports with a non-default visibility, and their preview URLs", tag: 'access', auth: 'user', params: boxName, status: 200, response: BoxPortListSchema },
  { operationId: 'setBoxPort', method: 'PUT', path: '/v1/boxes/{name}/ports/{port}', summary: "Set who may open a port's preview: private (default) or org", tag: 'access', auth: 'user', params: boxPort, body: SetBoxPortRequestSchema, status: 200, response: BoxPortSchema },
  { operationId: 'resetBoxPort', method: 'DELETE', path: '/v1/boxes/{name}/ports/{port}', summary: 'Make a port private again', tag: 'access', auth: 'user', params: boxPort, status: 204 },
  { operationId: 'listSshKeys', method: 'GET', path: '/v1/users/me/keys', summary: 'Your registered SSH public keys', tag: 'access', auth: 'user', status: 200, response: SshKeyListSchema },
  { operationId: 'addSshKey', method: 'POST', path: '/v1/users/me/keys', summary: 'Register an SSH public key for the gateway', tag: 'access', auth: 'user', body: AddSshKeyRequestSchema, status: 201, response: SshKeySchema },
  { operationId: 'removeSshKey', method: 'DELETE', path: '/v1/users/me/keys/{id}', summary: 'Remove one of your SSH keys (by id or fingerprint)', tag: 'access', auth: 'user', params: keyId, status: 204 },
  { operationId: 'createAccessToken', method: 'POST', path: '/v1/access-tokens', summary: 'A short-lived signed token for a gateway (browser terminal, previews, `devyard ssh`)', tag: 'access', auth: 'user', body: CreateAccessTokenRequestSchema, status: 201, response: AccessTokenSchema },
  { operationId: 'syncGateway', method: 'POST', path: '/v1/gateway/sync', summary: 'Gateway: register, report session activity and fetch the route table', tag: 'gateway', auth: 'gateway', body: GatewaySyncRequestSchema, status: 200, response: RouteTableSchema },
  { operationId: 'wakeBox', method: 'POST', path: '/v1/gateway/boxes/{id}/wake', summary: 'Gateway: start or resume a box for a user who connects to it', tag: 'gateway', auth: 'gateway', params: boxId, body: WakeBoxRequestSchema, status: 202, response: BoxSchema },
  { operationId: 'watchEvents', method: 'GET', path: '/v1/events', summary: 'Server-Sent Events of every box event the caller may see', tag: 'boxes', auth: 'user', status: 200, sse: true },
  { operationId: 'createTemplate', method: 'POST', path: '/v1/templates', summary: 'Publish a new immutable template version', tag: 'templates', auth: 'user', body: CreateTemplateRequestSchema, status: 201, response: TemplateSchema },
  { operationId: 'listTemplates', method: 'GET', path: '/v1/templates', summary: 'Latest version of every template', tag: 'templates', auth: 'user', status: 200, response: TemplateListSchema },
  {
    operationId: 'getTemplate',
    method: 'GET',
    path: '/v1/templates/{name}',
    summary: 'A template (latest version, or ?version=N)',
    tag: 'templates',
    auth: 'user',
    params: anyName,
    query: z.object({ version: z.coerce.number().int().positive().optional() }),
    status: 200,
    response: TemplateSchema,
  },
  { operationId: 'listTemplateVersions', method: 'GET', path: '/v1/templates/{name}/versions', summary: 'Every version of a template', tag: 'templates', auth: 'user', params: anyName, status: 200, response: TemplateListSchema },
  { operationId: 'listTemplatePrebuilds', method: 'GET', path: '/v1/templates/{name}/prebuilds', summary: "A template's prebuilds on every node, newest first, with their log tails", tag: 'templates', auth: 'user', params: anyName, status: 200, response: PrebuildListSchema },
  { operationId: 'listNodes', method: 'GET', path: '/v1/nodes', summary: 'Nodes with capacity and allocation', tag: 'nodes', auth: 'user', status: 200, response: NodeListSchema },
  { operationId: 'cordonNode', method: 'POST', path: '/v1/nodes/{name}/cordon', summary: 'Stop placing new boxes on a node', tag: 'nodes', auth: 'user', params: anyName, status: 200, response: NodeSchema },
  { operationId: 'uncordonNode', method: 'POST', path: '/v1/nodes/{name}/uncordon', summary: 'Allow placing boxes on a node again', tag: 'nodes', auth: 'user', params: anyName, status: 200, response: NodeSchema },
  { operationId: 'registerNode', method: 'POST', path: '/v1/agent/nodes', summary: 'Agent: register (or re-register) this node', tag: 'agent', auth: 'node', body: RegisterNodeRequestSchema, status: 200, response: RegisterNodeResponseSchema },
  { operationId: 'heartbeatNode', method: 'POST', path: '/v1/agent/nodes/{id}/heartbeat', summary: "Agent: renew the node's lease", tag: 'agent', auth: 'node', params: nodeId, body: HeartbeatRequestSchema, status: 200, response: z.object({ leaseExpiresAt: z.string() }) },
  { operationId: 'getDesiredSet', method: 'GET', path: '/v1/agent/nodes/{id}/desired', summary: 'Agent: the boxes this node must run (?watch=1 streams every change)', tag: 'agent', auth: 'node', params: nodeId, query: watchQuery, status: 200, response: DesiredSetSchema, sse: true },
  { operationId: 'reportStatus', method: 'POST', path: '/v1/agent/nodes/{id}/status', summary: 'Agent: report observed box phases', tag: 'agent', auth: 'node', params: nodeId, body: StatusReportRequestSchema, status: 204 },
] as const satisfies readonly RouteDef[];

export type OperationId = (typeof ROUTES)[number]['operationId'];

export function routeById(id: OperationId): RouteDef {
  const r = ROUTES.find((x) => x.operationId === id);
  if (!r) throw new Error(`unknown route ${id}`);
  return r;
}
