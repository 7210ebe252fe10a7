"""``nox -s demo``: swapd on tiny generated models, on any machine, no GPU needed.

Builds (or finds) llama-server, writes two tiny GGUF models and a config with three
profiles (two on the same file), prints what to try, and runs ``swapd serve``.
``SWAPD_DEMO_PORT`` changes the port (default 9001); files go to ``.demo/``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.support.llama_build import ensure_llama_server
from tests.support.tiny_gguf import write_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    demo = ROOT / ".demo"
    models = demo / "models"
    models.mkdir(parents=True, exist_ok=True)
    binary = ensure_llama_server()
    for name, seed in (("tiny-a", 1), ("tiny-b", 2)):
        path = models / f"{name}.gguf"
        if not path.exists():
            write_tiny_llama(path, seed=seed, context_length=8192, name=name)
    port = int(os.environ.get("SWAPD_DEMO_PORT", "9001"))
    config = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(demo / "state"),
        "llama_server": {"command": str(binary)},
        "profiles": {
            "tiny-a": {"model": str(models / "tiny-a.gguf"), "aliases": ["a"],
                       "display_name": "Tiny A (2K context)",
                       "flags": {"ctx-size": 2048, "threads": 2, "jinja": True}},
            "tiny-a-8k": {"model": str(models / "tiny-a.gguf"),
                          "display_name": "Tiny A (8K context)",
                          "flags": {"ctx-size": 8192, "threads": 2, "jinja": True}},
            "tiny-b": {"model": str(models / "tiny-b.gguf"), "aliases": ["b"],
                       "display_name": "Tiny B", "flags": {"ctx-size": 4096, "threads": 2}},
        },
    }
    path = demo / "swapd.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    url = f"http://127.0.0.1:{port}"
    print(f"""
swapd demo: {len(config['profiles'])} profiles on tiny random-weight models (answers are
gibberish; the swapping is real). Config: {path}

  curl {url}/v1/models
  curl -N {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "tiny-b", "stream": true, "messages": [{{"role": "user", "content": "hi"}}]}}'
  curl {url}/swapd/status

  python -c "import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='x'); \\
print(c.chat.completions.create(model='a', messages=[{{'role': 'user', 'content': 'hi'}}]))"

Ctrl-C stops swapd and the model.
""", flush=True)
    os.execvp(sys.executable, [sys.executable, "-m", "swapd", "serve", "--config", str(path)])


if __name__ == "__main__":
    main()
