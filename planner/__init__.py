"""`pdserve plan`: colocated vs disaggregated serving, simulated at any scale.

A discrete-event simulation runs the project's own scheduling code — the scheduler's
placement (`services/scheduler/policy.py`) and each worker's engine step scheduler
(`shared/engine/scheduler.py`) — over step times from a roofline cost model of the
hardware, and reports per mode P50/P99 TTFT, mean TPOT, P99 inter-token latency,
throughput and goodput per device, and the best prefill:decode split and layouts.

One concept per module:
- `hardware.py`     accelerator presets (sources stated) and `local` (fitted to this machine)
- `efficiency.py`   every efficiency factor and assumed latency, in one place
- `model_spec.py`   parameters, active parameters, FLOPs and KV bytes per token of a model
- `deployment.py`   instances, layouts, memory fit and KV capacity
- `cost_model.py`   roofline step time and KV hand-off time
- `sim_worker.py`   one simulated worker around the engine's `Scheduler`
- `simulator.py`    the event loop: arrivals, heartbeats, placement, steps, hand-offs
- `metrics.py`      per-request records -> P50/P99 TTFT, TPOT, ITL, throughput, SLO attainment
- `workload.py`     the bench's schedule (send times, lengths) without prompts
- `capacity.py`     closed-form capacity, to rank candidates before simulating them
- `scenario.py`     what is planned, and simulating a deployment (bench-shaped or steady state)
- `search.py`       goodput search, layouts and prefill:decode splits
- `plan.py`         a whole planning run: winners, the load, the recommendation, the curves
- `advice.py`       the `pdserve admin policy` command matching a recommendation
- `profile.py`      measuring this machine (engine steps, a real stack) and caching it
- `fit.py`          fitting the `local` hardware to a measured profile
- `calibrate.py`    the check of `local` against a measured `bench compare`-shaped run
- `report.py`, `plots.py`, `cli.py`   output and the command line
"""
