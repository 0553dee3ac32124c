/**
 * Prometheus metrics of the control plane, served at GET /metrics: API latency,
 * boxes by phase, reconcile queue depth and errors, create → running latency, node capacity and
 * allocation. Gauges that mirror the store are computed on scrape, so they are never stale.
 */
import type { FastifyInstance } from 'fastify';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { PHASES } from '@devyard/core/box-lifecycle';
import type { Store } from '../store/store.js';

export class ServerMetrics {
  readonly registry = new Registry();
  readonly httpDuration: Histogram<'method' | 'route' | 'status'>;
  readonly reconcileErrors: Counter;
  readonly createToRunning: Histogram;

  constructor(store: Store, queueDepth: () => number, now: () => number) {
    collectDefaultMetrics({ register: this.registry, prefix: 'devyard_server_' });
    this.httpDuration = new Histogram({
      name: 'devyard_http_request_duration_seconds',
      help: 'API request latency',
      labelNames: ['method', 'route', 'status'],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers: [this.registry],
    });
    this.reconcileErrors = new Counter({ name: 'devyard_reconcile_errors_total', help: 'Unexpected errors in box reconcile passes', registers: [this.registry] });
    this.createToRunning = new Histogram({
      name: 'devyard_box_create_to_running_seconds',
      help: 'Time from create to the first running report (provisioning latency)',
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
      registers: [this.registry],
    });
    new Gauge({
      name: 'devyard_reconcile_queue_depth',
      help: 'Boxes waiting for a reconcile pass',
      registers: [this.registry],
      collect() {
        this.set(queueDepth());
      },
    });
    new Gauge({
      name: 'devyard_boxes',
      help: 'Boxes by phase',
      labelNames: ['phase'],
      registers: [this.registry],
      async collect() {
        const counts = new Map<string, number>(PHASES.map((p) => [p, 0]));
        for (const b of await store.listBoxes()) counts.set(b.phase, (counts.get(b.phase) ?? 0) + 1);
        for (const [phase, n] of counts) this.set({ phase }, n);
      },
    });
    const nodeGauge = (name: string, help: string, pick: 'capacity' | 'allocated') =>
      new Gauge({
        name,
        help,
        labelNames: ['node', 'resource'],
        registers: [this.registry],
        async collect() {
          this.reset();
          for (const n of await store.listNodes()) {
            this.set({ node: n.name, resource: 'cpu_millis' }, n[pick].cpuMillis);
            this.set({ node: n.name, resource: 'memory_bytes' }, n[pick].memoryBytes);
            this.set({ node: n.name, resource: 'disk_bytes' }, n[pick].diskBytes);
          }
        },
      });
    nodeGauge('devyard_node_capacity', 'Node capacity offered to the scheduler', 'capacity');
    nodeGauge('devyard_node_allocated', 'Node capacity reserved by boxes', 'allocated');
    new Gauge({
      name: 'devyard_nodes_ready',
      help: 'Nodes with a valid lease',
      registers: [this.registry],
      async collect() {
        this.set((await store.listNodes()).filter((n) => n.leaseExpiresAt > now()).length);
      },
    });
  }

  /** Times every request and serves /metrics. */
  install(app: FastifyInstance): void {
    app.addHook('onResponse', async (req, reply) => {
      const route = req.routeOptions.url ?? 'unmatched';
      this.httpDuration.observe({ method: req.method, route, status: String(reply.statusCode) }, reply.elapsedTime / 1000);
    });
    app.get('/metrics', async (_req, reply) => reply.type(this.registry.contentType).send(await this.registry.metrics()));
  }
}
