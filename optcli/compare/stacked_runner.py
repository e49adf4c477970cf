"""The runner of `compare --vectorize`: the seeds of each optimizer spec trained as one stacked model where that is
exact (engine/stacked.py), the plain path where it is not; the same interface and records as the other runners."""

from __future__ import annotations

import json

from optcli.compare.runners import OptimizerSpec, Plan, TrialCallbacks, TrialRunner, _interrupted, run_trial
from optcli.config import Config
from optcli.engine.loop import History
from optcli.engine.stacked import fit_stacked, stacking_refusal
from optcli.tasks import Data


class StackedRunner(TrialRunner):
    """Runs a plan with the seeds of each optimizer spec stacked into one model where that is exact, and the
    plain path (run_trial) where it is not; `notes` holds one line per spec that could not be stacked, and one per
    spec whose seeds a user's model stacks through torch.func."""

    def __init__(self, cfg: Config, data: Data, callbacks: TrialCallbacks | None = None):
        super().__init__(callbacks)
        self.cfg, self.data = cfg, data
        self.notes: list[str] = []  # one line per optimizer whose seeds ran the plain path (and why) or torch.func

    def run(self, plan: Plan) -> list[History]:
        groups: dict[str, tuple[OptimizerSpec, list[int]]] = {}
        for spec, seed in plan:
            key = _group_key(spec)
            groups.setdefault(key, (spec, []))[1].append(seed)
        results: dict[tuple[str, int], History] = {}
        try:
            self._run_groups(groups, results)
        except KeyboardInterrupt as exc:  # a stop signal: the finished trials are kept, as the serial runner keeps them
            keys = [(_group_key(s), seed) for s, seed in plan]
            raise _interrupted({i: results[k] for i, k in enumerate(keys) if k in results}, plan, exc) from None
        return [results[(_group_key(s), seed)] for s, seed in plan]

    def _run_groups(self, groups: dict, results: dict) -> None:
        cb = self.callbacks
        for key, (spec, seeds) in groups.items():
            reason = stacking_refusal(self.cfg, spec, self.data.train.x.device) if len(seeds) > 1 else "one seed"
            if reason is not None and len(seeds) > 1:
                self.notes.append(f"--vectorize: {spec.label} runs its seeds one by one: {reason}")
            elif reason is None and self.cfg.model.is_user_model:
                self.notes.append(f"--vectorize: {spec.label} stacks its {len(seeds)} seeds through torch.func")
            if cb.on_trial_start:
                for seed in seeds:
                    cb.on_trial_start(spec.label, seed)
            if reason is None:
                histories = fit_stacked(self.cfg, self.data, spec, seeds, on_epoch=cb.on_epoch)
                results.update({(key, seed): h for seed, h in zip(seeds, histories, strict=True)})
            for seed in seeds:
                if reason is not None:  # stored one by one, so that an interruption keeps the finished ones
                    results[(key, seed)] = run_trial(self.cfg, self.data, spec, seed, on_epoch=cb.on_epoch)
                if cb.on_trial_done:
                    cb.on_trial_done(spec.label, seed, results[(key, seed)])


def _group_key(spec: OptimizerSpec) -> str:
    """Trials with equal keys differ only in their seed (tuning trials share a label but not an lr)."""
    return json.dumps([spec.label, spec.name, spec.kwargs], sort_keys=True, default=str)
