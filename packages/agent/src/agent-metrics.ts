/**
 * Prometheus metrics of a node agent, served at GET /metrics on its session
 * endpoint: how long each box step takes on this node, how often steps fail, and whether the
 * control plane is reachable.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export class AgentMetrics {
  readonly registry = new Registry();
  readonly stepSeconds: Histogram<'step'>;
  readonly stepErrors: Counter<'step'>;

  constructor(opts: { serverReachable: () => boolean; boxes: () => number }) {
    collectDefaultMetrics({ register: this.registry, prefix: 'devyard_agent_' });
    this.stepSeconds = new Histogram({
      name: 'devyard_agent_step_seconds',
      help: 'Duration of box steps on this node (start, stop, pause, resume, destroy, create)',
      labelNames: ['step'],
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 120],
      registers: [this.registry],
    });
    this.stepErrors = new Counter({ name: 'devyard_agent_step_errors_total', help: 'Failed box steps', labelNames: ['step'], registers: [this.registry] });
    new Gauge({
      name: 'devyard_agent_server_reachable',
      help: '1 while the last call to the control plane succeeded',
      registers: [this.registry],
      collect() {
        this.set(opts.serverReachable() ? 1 : 0);
      },
    });
    new Gauge({
      name: 'devyard_agent_desired_boxes',
      help: 'Boxes in the desired set of this node',
      registers: [this.registry],
      collect() {
        this.set(opts.boxes());
      },
    });
  }
}
