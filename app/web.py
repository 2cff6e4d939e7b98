"""Mounting the chat page (/) and the arena (/arena) on the API's FastAPI app: one process, one port."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls home

import gradio as gr

from app import arena, chat
from app.models import LocalModel, RemoteModel


@dataclass
class PageOptions:
    open: bool = False  # with an API key set: leave the pages open instead of asking for the key
    remote: list[RemoteModel] = field(default_factory=list)  # extra arena contestants (other servers)
    votes: arena.VoteStore | None = None  # the arena's votes (default: $QT_HOME/arena.sqlite)
    prompts: list[str] = field(default_factory=list)  # the arena's prompt set (`arena.load_prompts`)


def page_secret() -> str:
    """A random key kept in $QT_HOME (mode 600), so the chat saved in browsers survives restarts."""
    import secrets

    from qt_serve.hub import home

    path = home() / "page-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(secrets.token_urlsafe(32))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_text().strip()


def mount(api, generators: dict, options: PageOptions, api_key: str | None) -> None:
    import hmac

    from fastapi.responses import RedirectResponse

    local = {name: LocalModel(g) for name, g in generators.items()}
    contestants = {**local, **{m.name: m for m in options.remote}}
    store = options.votes or arena.VoteStore(arena.default_db())

    def auth(_user: str, password: str) -> bool:  # the key in constant time, any user name
        return hmac.compare_digest(password.encode(), api_key.encode())

    # With a key, the pages ask for it unless told to stay open.
    login = None if (api_key is None or options.open) else auth
    message = "This server needs its API key: any user name, the key as password."
    # /arena (as people type it) goes to the mounted app at /arena/.
    api.add_api_route("/arena", lambda: RedirectResponse("/arena/"), include_in_schema=False)
    gr.mount_gradio_app(api, arena.build(contestants, store, options.prompts), path="/arena", auth=login,
                        auth_message=message, footer_links=["api"], run_history=False)
    gr.mount_gradio_app(api, chat.build(local, page_secret()), path="", auth=login, auth_message=message,
                        footer_links=["api"], run_history=False)
