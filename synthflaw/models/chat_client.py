"""One chat client for the two jobs that ask a model to write: the SynthQA generator (stage 01 on real data) and the
chat judge (stage 07). Two back ends, one interface:

- `EndpointChat`: any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, TGI, llama.cpp server) through
  the `openai` SDK, which brings the retries (connection errors, timeouts, 408/409/429/5xx, exponential backoff,
  server-sent Retry-After) and the timeouts. Greedy (temperature 0).
- `LocalChat`: a local transformers causal LM (a hub id or a folder), greedy and batched through
  :func:`synthflaw.models.generation.generate_ids`; the model loads at the first call.

Both give `complete(messages) -> Generation` and `generate(prompts) -> list[Generation]` (one user turn each).
A failure that says nothing about the prompt (the endpoint unreachable, overloaded, or erring after every retry)
comes back as ``Generation(error="endpoint_error")``; a request the endpoint rejects (other 4xx) as
``"endpoint_rejected"``; a configuration error (401/403/404: URL, model name or key wrong) raises.

Secrets: the API key is read from the environment variable the config names, never from a parameter, and goes
only into the Authorization header. Everything the client hands back (reply texts, error details, exception
messages) passes through `redact` first, so an endpoint that echoes the request cannot carry the key into a run
folder, a notebook or a log; exceptions are raised outside the SDK error's except block, so that error (unredacted)
is neither chained to them nor a local variable of a frame in their traceback.
"""

from __future__ import annotations

import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from synthflaw.data.synthqa_generation import Generation
from synthflaw.hub import require_hub

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
REDACTED = "[redacted]"
# Detail kept of an error body: enough to see what went wrong, bounded so a failures file stays small. Cut after
# redaction, so a key cannot be cut into a prefix that `redact` no longer recognises.
DETAIL_CHARS = 300


def redact(text: str | None, secrets) -> str | None:
    """`text` with every occurrence of each non-empty secret replaced by "[redacted]"."""
    if text is None:
        return None
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def api_key(env_name: str | None, *, required: bool, what: str) -> str | None:
    """The key in the environment variable `env_name`; RuntimeError naming the variable when it is required and
    missing (`what` names the config key that holds the variable's name)."""
    key = os.environ.get(env_name) if env_name else None
    if not key and required:
        if not env_name:
            raise RuntimeError(f"{what} is empty: name the environment variable that holds the endpoint's API key "
                               "(e.g. OPENAI_API_KEY); only an endpoint on localhost needs no key")
        raise RuntimeError(f"the endpoint's API key is not set: export {env_name}=... (the variable {what} names); "
                           "only an endpoint on localhost needs no key")
    return key


class EndpointChat:
    """Greedy chat completions from an OpenAI-compatible endpoint, e.g. base_url="https://api.openai.com/v1" (a URL
    already ending in /chat/completions is accepted too).

    `api_key_env` names the environment variable holding the key; an endpoint on localhost needs none. `concurrency`
    requests of a `generate` batch run at once. `max_retries` and `timeout` go to the SDK.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None, max_new_tokens: int, *,
                 concurrency: int = 8, timeout: float = 300.0, max_retries: int = 3,
                 key_setting: str = "the api_key_env setting") -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the endpoint must be an http(s) URL such as https://api.openai.com/v1, got {base_url!r}")
        if not model:
            raise ValueError("the endpoint's model name is empty (e.g. gpt-4o-mini)")
        from openai import OpenAI  # only the endpoint path needs the SDK

        base = base_url.rstrip("/").removesuffix("/chat/completions")
        self.base_url, self.name, self.max_new_tokens = base, model, max_new_tokens
        self.concurrency = max(1, concurrency)
        self.api_key_env = api_key_env
        needs_key = urllib.parse.urlparse(base).hostname not in LOCAL_HOSTS
        api_key(api_key_env, required=needs_key, what=key_setting)  # a missing key fails here, before any work
        # The key is read from the environment at each request, never kept on this object (the SDK client keeps the
        # last one it sent in memory, as `_client.api_key`; neither its repr nor this object's shows it). The SDK
        # insists on a key; a local server without one gets a placeholder, which it ignores.
        self._client = OpenAI(base_url=base, api_key=lambda: api_key(api_key_env, required=False, what="") or "no-key",
                              timeout=timeout, max_retries=max_retries)

    def __repr__(self) -> str:
        return f"EndpointChat(base_url={self.base_url!r}, model={self.name!r})"

    def _clean(self, text: str | None, limit: int | None = None) -> str | None:
        text = redact(text, [api_key(self.api_key_env, required=False, what="")])
        return text[:limit] if text is not None and limit else text

    def complete(self, messages: list[dict]) -> Generation:
        import openai

        try:
            answer = self._client.chat.completions.create(model=self.name, messages=messages, temperature=0,
                                                          max_tokens=self.max_new_tokens)
        except openai.APIStatusError as error:
            status, detail = error.status_code, self._clean(f"HTTP {error.status_code}: {error.message}", DETAIL_CHARS)
        except openai.APIError as error:  # connection errors and timeouts, after the SDK's retries
            return Generation("", error="endpoint_error",
                              detail=self._clean(f"{type(error).__name__}: {error}", DETAIL_CHARS))
        else:
            return self._generation(answer)
        # Raised here, after the except block: inside it, the SDK's error (whose message is the endpoint's body,
        # unredacted) would be chained to this one as its __context__ (hidden by `from None` in a printed
        # traceback, but still attached) and a local of the frame (shown by tracebacks with local variables).
        if status in (401, 403, 404):
            raise RuntimeError(f"the endpoint {self.base_url} refused the request ({detail}); check the URL, the "
                               "model name and the API key")
        retried = status in (408, 409, 429) or status >= 500
        return Generation("", error="endpoint_error" if retried else "endpoint_rejected", detail=detail)

    def _generation(self, answer) -> Generation:
        choices = getattr(answer, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            return Generation("", error="endpoint_error",
                              detail=self._clean(f"no chat completion in the answer: {answer}", DETAIL_CHARS))
        return Generation(self._clean(choices[0].message.content or ""),
                          truncated=choices[0].finish_reason == "length")

    def generate(self, prompts: list[str]) -> list[Generation]:
        messages = [[{"role": "user", "content": p}] for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(prompts)))) as pool:
            return list(pool.map(self.complete, messages))


class LocalChat:
    """Greedy chat with a local transformers causal LM (a hub id or a folder), batched with left padding.

    Messages go through the tokenizer's chat template when it has one (instruct models; a template that refuses a
    system turn gets it folded into the user's), else they are joined as plain text after BOS. The model loads at
    the first call, so building the client is cheap and fails only on a hub name while the hub is off.
    """

    def __init__(self, model_name_or_path: str, max_new_tokens: int, *, device: str | None = None,
                 dtype: str = "auto", key: str = "model") -> None:
        require_hub(key, str(model_name_or_path))
        self.name, self.max_new_tokens = str(model_name_or_path), max_new_tokens
        self.device, self.dtype = device, dtype
        self.model = self.tokenizer = None

    def __repr__(self) -> str:
        return f"LocalChat({self.name!r})"

    def _load(self) -> None:
        if self.model is not None:
            return
        from synthflaw.models.build import load_model
        from synthflaw.models.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.name)
        self.model = load_model(self.name, dtype=self.dtype, device=self.device).eval()

    def _text(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        if not getattr(self.tokenizer, "chat_template", None):
            return (self.tokenizer.bos_token or "") + "\n\n".join(m["content"] for m in messages) + "\n"
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError:  # some templates refuse a system turn: fold it into the first user turn
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
            rest = [m for m in messages if m["role"] != "system"]
            rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}
            return self.tokenizer.apply_chat_template(rest, add_generation_prompt=True, tokenize=False)

    def _run(self, conversations: list[list[dict]]) -> list[Generation]:
        from synthflaw.models.generation import generate_ids

        self._load()
        ids, counts = generate_ids(self.model, self.tokenizer, [self._text(m) for m in conversations],
                                   self.max_new_tokens, max(1, len(conversations)))
        # no stop token within the budget: the output was cut
        return [Generation(self.tokenizer.decode(seq, skip_special_tokens=True).strip(),
                           truncated=len(seq) == n == self.max_new_tokens) for seq, n in zip(ids, counts)]

    def complete(self, messages: list[dict]) -> Generation:
        return self._run([messages])[0]

    def generate(self, prompts: list[str]) -> list[Generation]:
        return self._run([[{"role": "user", "content": p}] for p in prompts])


def make_chat_client(model: str, endpoint: str, api_key_env: str, max_new_tokens: int, *, concurrency: int = 8,
                     key: str = "model", key_env_setting: str = "api_key_env"):
    """The endpoint client when `endpoint` is set, else the local model `model`. `key` and `key_env_setting` are the
    config keys of `model` and of the key's variable name (e.g. data.generator, data.generator_api_key_env), for
    error messages."""
    if endpoint:
        return EndpointChat(endpoint, model, api_key_env, max_new_tokens, concurrency=concurrency,
                            key_setting=key_env_setting)
    if not model:
        raise ValueError(f"{key} is empty: name a local model folder or hub id (e.g. Qwen/Qwen2.5-1.5B-Instruct), "
                         "or an endpoint and its model name")
    return LocalChat(model, max_new_tokens, key=key)
