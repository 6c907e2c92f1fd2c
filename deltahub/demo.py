"""``deltahub demo``: the whole product on one machine, offline, in a few minutes on 2 CPU cores.

Steps (each a method of ``Demo``, run in order by ``Demo.run``):

1. models     a tiny Llama base and fine-tunes of it on different chat tasks (deltahub.toy),
              really trained; cached under ``constants.cache_dir()/demo/models``.
2. hub        the embedded Hub (deltahub.localhub) on a free port, storage in the demo folder.
3. upload     base and fine-tunes as ordinary model repos (``demo/tiny-base``, ...).
4. push       ``deltahub push`` of every fine-tune: base inferred from its card, compressed,
              model card written, uploaded as ``demo/tiny-<task>-delta``.
5. check      ``deltahub reconstruct`` of one delta into a fresh Hugging Face cache, compared
              with the original fine-tune (logits and greedy answers).
6. serve      ``deltahub serve`` (base + the deltas, loaded lazily from the embedded Hub) and
              the Gradio playground, until Ctrl-C.

Every Hub call goes through the real huggingface_hub client (HF_ENDPOINT, HF_HUB_DISABLE_XET=1,
a demo-private HF_HOME); the user's own token and cache are never used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltahub import constants

ORG = "demo"
TASKS = ("upper", "pirate")
PROMPTS = ("good morning my friend", "the river runs fast")
# Client variables the demo owns while it runs (the rest of the environment is left alone).
OWNED_ENV = ("HF_ENDPOINT", "HF_HUB_DISABLE_XET", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
             "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "DELTAHUB_CACHE",
             "HF_HUB_DISABLE_PROGRESS_BARS")


def demo_root() -> Path:
    """Where the demo keeps its models, Hub storage and caches: ``constants.cache_dir()/demo``."""
    return constants.cache_dir() / "demo"


@dataclass
class DemoOptions:
    root: Path = field(default_factory=demo_root)
    tasks: tuple[str, ...] = TASKS
    hub_port: int = 0  # 0 = any free port
    serve: bool = True
    serve_port: int = 8080
    ui_port: int = 7860
    method: str = "obs"
    bits: int = 4
    sparsity: str = "2:4"
    # obs's saliency mask, not the 4-bit default's random one: on these tiny 2-layer fine-tunes it
    # reconstructs better (top-1 agreement on PROMPTS, tiny-upper: 0.93 vs 0.68-0.81 over 3 seeds)
    options: dict[str, Any] = field(default_factory=lambda: {"mask": "obs"})
    calibration_samples: int = 16
    seq_len: int = 128


@contextlib.contextmanager
def client_env(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` and drop the other OWNED_ENV variables; restore everything afterwards."""
    saved = {k: os.environ.get(k) for k in OWNED_ENV}
    try:
        for k in OWNED_ENV:
            os.environ.pop(k, None)
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Demo:
    """The demo's state; ``say`` receives every line it prints."""

    def __init__(self, options: DemoOptions | None = None, say: Callable[[str], None] = print) -> None:
        self.o = options or DemoOptions()
        self.say = say
        self.models: dict[str, Path] = {}
        self.hub: Any = None
        self.repos: dict[str, str] = {}  # name -> model repo id
        self.deltas: dict[str, Any] = {}  # task -> PushOutcome
        self.check: dict[str, Any] = {}
        self.procs: list[subprocess.Popen] = []
        self.urls: dict[str, str] = {}
        self._step = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self._step += 1
        self.say(f"[{self._step}] {title}")
        t = time.time()
        yield
        self.say(f"    done in {time.time() - t:.1f} s")

    # ------------------------------------------------------------------ 1. models
    def build_models(self) -> dict[str, Path]:
        from deltahub import toy

        folder = self.o.root / "models"
        folder.mkdir(parents=True, exist_ok=True)
        base_id = f"{ORG}/tiny-base"

        def trained(name: str, make: Callable[[Path], Any]) -> Path:
            target = folder / name
            if not (target / "config.json").is_file():
                self.say(f"    training {name} ...")
            return _cached(target, make)

        self.models["base"] = trained("tiny-base", lambda p: toy.make_base(p))
        for task in self.o.tasks:
            self.models[task] = trained(f"tiny-{task}", lambda p, t=task: toy.make_finetune(
                self.models["base"], p, t, base_model_id=base_id))
        for name, path in self.models.items():
            self.say(f"    {name:<8} {path}")
        return self.models

    # ------------------------------------------------------------------ 2. hub
    def start_hub(self):
        from deltahub.localhub import LocalHub

        self.hub = LocalHub(self.o.root / "hub", port=self.o.hub_port).start()
        self.urls["hub"] = self.hub.url
        self.say(f"    embedded Hub at {self.hub.url} (storage {self.o.root / 'hub'})")
        return self.hub

    def env(self, hf_home: Path | None = None) -> dict[str, str]:
        """Client environment for this demo's Hub (for this process and subprocesses)."""
        return {**self.hub.client_env(), "HF_HOME": str(hf_home or self.o.root / "hf"),
                "DELTAHUB_CACHE": str(self.o.root / "deltahub"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

    # ------------------------------------------------------------------ 3. upload
    def upload_models(self) -> dict[str, str]:
        from deltahub import hub

        for name, path in self.models.items():
            repo = f"{ORG}/{path.name}"
            r = hub.upload_folder(path, repo, commit_message=f"Upload {path.name}")
            self.repos[name] = repo
            self.say(f"    {r.url}  ({'new commit' if r.changed else 'already there'} {r.commit[:10]})")
        return self.repos

    # ------------------------------------------------------------------ 4. push
    def push_deltas(self) -> dict[str, Any]:
        from deltahub.compress import CompressConfig
        from deltahub.push import push
        from deltahub.store import DeltaReader

        cfg = CompressConfig(method=self.o.method, bits=self.o.bits, sparsity=self.o.sparsity,
                             options=dict(self.o.options), calibration_samples=self.o.calibration_samples,
                             seq_len=self.o.seq_len)
        flags = "".join(f" --codec-option {k}={v}" for k, v in self.o.options.items())
        for task in self.o.tasks:
            self.say(f"    deltahub push {self.repos[task]}{flags}")
            out = push(self.repos[task], compress_config=cfg, progress=False,
                       log=lambda m: self.say(f"      {m}"))
            stats = DeltaReader(out.folder).config.stats
            self.deltas[task] = out
            state = "new commit" if out.changed else "unchanged, no new commit"
            self.say(f"      -> {out.url}  ({state}; {stats['payload_bytes'] / 1e6:.2f} MB, "
                     f"{stats['ratio_vs_bf16']:.1f}x smaller than the fine-tune in bf16)")
        return self.deltas

    # ------------------------------------------------------------------ 5. check
    def reconstruct_and_check(self, task: str | None = None) -> dict[str, Any]:
        from deltahub.reconstruct import reconstruct

        task = task or self.o.tasks[0]
        delta = self.deltas[task].repo_id
        out = self.o.root / "reconstructed" / f"tiny-{task}"
        shutil.rmtree(out, ignore_errors=True)
        fresh = self.o.root / f"hf-fresh-{os.getpid()}"
        shutil.rmtree(fresh, ignore_errors=True)
        try:
            with client_env(self.env(hf_home=fresh)):  # nothing cached: base and delta come from the Hub
                self.say(f"    deltahub reconstruct {delta} --output {out}   (fresh HF_HOME)")
                reconstruct(delta, out, progress=False)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
        self.check = compare(self.models["base"], self.models[task], out)
        c = self.check
        self.say(f"    logits vs the original fine-tune: max |diff| {c['max_abs_diff']:.4f}, "
                 f"top-1 agreement {c['top1_agreement']:.1%}")
        for prompt, (b, f, r) in zip(PROMPTS, c["answers"], strict=True):
            self.say(f"    {prompt!r}\n      base: {b!r}\n      fine-tune: {f!r}\n      reconstructed: {r!r}")
        return self.check

    # ------------------------------------------------------------------ 6. serve
    def serve(self) -> dict[str, str]:
        """Start ``deltahub serve`` and the playground as subprocesses; wait until they answer."""
        env = {**os.environ, **self.env()}
        variants = [f"--variant={task}={out.repo_id}" for task, out in self.deltas.items()]
        serve_url = f"http://127.0.0.1:{self.o.serve_port}"
        self._spawn([sys.executable, "-m", "deltahub.cli.main", "serve", "--base", self.repos["base"],
                     *variants, "--port", str(self.o.serve_port), "--log-level", "warning"], env)
        _wait_http(f"{serve_url}/health", self.procs[-1], "deltahub serve")
        self.urls["server"] = serve_url
        self.say(f"    deltahub serve: {serve_url}  (OpenAI: {serve_url}/v1, TGI: {serve_url}/generate)")
        ui_url = f"http://127.0.0.1:{self.o.ui_port}"
        self._spawn([sys.executable, "-m", "deltahub.cli.main", "ui", "--server", serve_url,
                     "--port", str(self.o.ui_port)], env)
        _wait_http(ui_url, self.procs[-1], "playground")
        self.urls["playground"] = ui_url
        self.say(f"    playground: {ui_url}")
        return self.urls

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        self.procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))

    def stop(self) -> None:
        """Stop the subprocesses (SIGTERM, then SIGKILL after 10 s) and the Hub."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self.hub is not None:
            self.hub.stop()
            self.hub = None

    # ------------------------------------------------------------------ all
    def run(self, *, wait: bool = True) -> dict[str, Any]:
        """All steps; with ``serve`` and ``wait``, blocks until Ctrl-C. Returns a summary."""
        t0 = time.time()
        try:
            with self.step("building the tiny base model and its fine-tunes (cached after the first run)"):
                self.build_models()
            with self.step("starting the embedded Hub"):
                self.start_hub()
            with client_env(self.env()):
                with self.step("uploading them as ordinary model repos"):
                    self.upload_models()
                with self.step("deltahub push: compressing each fine-tune into a delta repo"):
                    self.push_deltas()
                with self.step("deltahub reconstruct: rebuilding a fine-tune from the Hub and comparing"):
                    self.reconstruct_and_check()
                if self.o.serve:
                    with self.step("deltahub serve + the playground (deltas loaded lazily from the Hub)"):
                        self.serve()
            self.say(f"ready in {time.time() - t0:.0f} s")
            for name, url in self.urls.items():
                self.say(f"  {name:<11} {url}")
            for out in self.deltas.values():
                self.say(f"  delta       {out.url}")
            if self.o.serve and wait:
                self.say("Ctrl-C stops everything.")
                while all(p.poll() is None for p in self.procs):
                    time.sleep(0.5)
                failed = [p.args[3] for p in self.procs if p.poll() is not None]
                self.say(f"{', '.join(failed)} exited; stopping the demo")
        except KeyboardInterrupt:
            self.say("stopping ...")
        finally:
            if wait or not self.o.serve:
                self.stop()
        return {"urls": dict(self.urls), "deltas": {t: o.url for t, o in self.deltas.items()},
                "check": self.check, "seconds": time.time() - t0}


def _cached(target: Path, make: Callable[[Path], Any]) -> Path:
    """Build into a private folder and rename it into place (a later run reuses it)."""
    if not (target / "config.json").is_file():
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    from deltahub.errors import DeltahubError

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise DeltahubError(f"{what} exited with code {proc.returncode} before answering on {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.5)
    raise DeltahubError(f"{what} did not answer on {url} within {timeout:.0f} s")


def compare(base: Path, finetuned: Path, reconstructed: Path) -> dict[str, Any]:
    """Logits (max |diff|, top-1 agreement over the prompts' chat tokens) and greedy answers of
    base, fine-tune and reconstruction."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltahub import toy

    tok = AutoTokenizer.from_pretrained(str(finetuned))
    models = [AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()
              for p in (base, finetuned, reconstructed)]
    texts = [toy.chat_text(p, p) for p in PROMPTS]
    diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            f, r = (m(ids).logits[0] for m in models[1:])
            diff = max(diff, float((f - r).abs().max()))
            agree += int((f.argmax(-1) == r.argmax(-1)).sum())
            total += f.shape[0]
    answers = [tuple(toy.greedy(m, tok, p) for m in models) for p in PROMPTS]
    return {"max_abs_diff": diff, "top1_agreement": agree / total, "answers": answers}
