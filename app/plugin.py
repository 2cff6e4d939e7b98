"""The pages as a qt-serve plugin (entry point group `qt_serve.pages`, name `page`).

qt-serve (in `qt_serve`, which imports nothing from here) asks each plugin for its flags, lets
it check them before the models load, and has it mount its pages on the finished API app:

    add_flags(parser)                       the --no-page, --open-page and --arena-* flags
    prepare(args) -> options | None         None: no page this run
    mount(app, generators, options, api_key)

Gradio is imported only when the pages are really built, so `qt-serve --help` stays quick.
"""

from __future__ import annotations

from qt_serve.errors import QtError


def add_flags(ap) -> None:
    page = ap.add_argument_group("chat page (/) and arena (/arena)")
    page.add_argument("--no-page", action="store_true", help="serve the API only (/ redirects to /docs)")
    page.add_argument("--open-page", action="store_true",
                      help="with --api-key: leave the pages open instead of asking for the key")
    page.add_argument("--arena-model", action="append", default=[], metavar="NAME=URL[#MODEL]",
                      help="add a model of another OpenAI-compatible server to the arena (key from $NAME_API_KEY)")
    page.add_argument("--arena-db", default=None, help="SQLite file for arena votes (default $QT_HOME/arena.sqlite)")
    page.add_argument("--arena-prompts", default=None, metavar="FILE",
                      help="prompt set for the arena's 'Random prompt': JSON / JSONL of instructions, or "
                           "'alpaca-eval' (AlpacaEval's 805, fetched once from PyPI)")


def prepare(args):
    """The page options (`web.PageOptions`) from the flags, or None with --no-page; a bad flag fails
    here, before the models load (minutes)."""
    from app import arena
    from app.models import parse_remote
    from app.web import PageOptions

    if args.no_page:
        if args.open_page or args.arena_model or args.arena_db or args.arena_prompts:
            raise QtError("--open-page and the --arena-* flags set up the pages, which --no-page turns off")
        return None
    return PageOptions(open=args.open_page, remote=[parse_remote(m) for m in args.arena_model],
                       votes=arena.VoteStore(args.arena_db) if args.arena_db else None,
                       prompts=arena.load_prompts(args.arena_prompts) if args.arena_prompts else [])


def mount(app, generators: dict, options, api_key: str | None) -> None:
    from app import web

    web.mount(app, generators, options, api_key)
