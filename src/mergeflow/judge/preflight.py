"""Judge preflight: before any job runs, check that the configured judge can answer.

A hosted endpoint must have its key in the environment and must serve the judge model
(`GET /models`); a launched server must have its executable and model directory. Errors
name the config key and the endpoint. Standard library only: it runs inside the Snakemake
process (`onstart:`), whose environment need not have the judging packages.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.judge.client import Endpoint
from mergeflow.judge.server import Launch

log = logging.getLogger(__name__)

KEY = "judge.endpoint"


def preflight(settings: dict, *, model_dir_built: bool = False, env_provides_server: bool = False,
              timeout: float = 15.0) -> str:
    """Raise MergeflowError naming the config key and the endpoint if the judge cannot work;
    return a one-line description of what was checked. `model_dir_built`: the workflow
    produces the launched server's model directory (fetched from the Hub, or the demo's);
    `env_provides_server`: the judging job's own (conda) environment has the server."""
    endpoint = Endpoint.from_settings(settings)
    if endpoint.launch is not None:
        return _check_launch(Launch.from_settings(endpoint.launch), model_dir_built, env_provides_server)
    return _check_hosted(endpoint, timeout)


def _check_launch(launch: Launch, model_dir_built: bool, env_provides_server: bool) -> str:
    where = f"local `{launch.server} serve`"
    if not env_provides_server and launch.executable() is None:
        raise MergeflowError(
            f"config key '{KEY}.launch.server': {where} needs the `{launch.server}` executable, which is not on PATH"
            + (" (run with --sdm conda, or install vllm: envs/vllm.yaml)" if launch.server == "vllm" else ""))
    if not model_dir_built and not (Path(launch.model) / "config.json").is_file():
        raise MergeflowError(
            f"config key '{KEY}.launch.model': {launch.model} is not a model directory (no config.json) for {where}")
    found = "in the job's environment" if env_provides_server else "present"
    return f"{where} of {launch.model}: executable {found}, model present or built by the plan (not started)"


def _check_hosted(endpoint: Endpoint, timeout: float) -> str:
    url = endpoint.base_url.rstrip("/")
    try:
        key = endpoint.api_key(local=False)
    except MergeflowError:
        variable = f"${endpoint.api_key_env}" if endpoint.api_key_env else "(none set)"
        raise MergeflowError(f"config key '{KEY}.api_key_env': the judge endpoint {url} needs an API key, "
                             f"and {variable} is not set in the environment") from None
    served = _served_models(url, key, timeout)
    if endpoint.model not in served:
        shown = ", ".join(sorted(served)[:20]) + (" ..." if len(served) > 20 else "")
        raise MergeflowError(
            f"config key '{KEY}.model': the judge endpoint {url} does not serve {endpoint.model!r} "
            f"(it serves: {shown or 'nothing'})")
    return f"{url} serves {endpoint.model}"


def _served_models(url: str, key: str, timeout: float) -> set[str]:
    request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        hint = (f" (the key in config key '{KEY}.api_key_env' was rejected)" if err.code in (401, 403) else "")
        raise MergeflowError(f"config key '{KEY}.base_url': GET {url}/models answered HTTP {err.code}{hint}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise MergeflowError(f"config key '{KEY}.base_url': judge endpoint {url} unreachable: {reason}") from None
    except ValueError:
        raise MergeflowError(f"config key '{KEY}.base_url': GET {url}/models did not return JSON") from None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise MergeflowError(f"config key '{KEY}.base_url': GET {url}/models is not an OpenAI model list")
    return {m.get("id") for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)}
