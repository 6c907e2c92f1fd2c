"""The Gradio playground: chat with any variant a deltahub server serves, or compare several.

Talks to the server over HTTP only (deltahub.playground_client), so it works against any
deployment. ``build_app(url)`` returns the ``gr.Blocks`` (mountable in a FastAPI app with
``gr.mount_gradio_app``); ``launch(url)`` serves it; ``deltahub ui --server URL`` and the
top-level ``app.py`` call ``launch``. gradio (the ``ui`` extra) is imported on use.

The chat keeps its own conversation (``turns``: dicts ``{"role", "content", "variant", "note",
"failed", "done"}``); the chatbot only displays it, so switching variant keeps the conversation
and per-reply notes (timings, errors) never reach the model.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from deltahub.errors import DeltahubError, RemoteServerError
from deltahub.playground_client import (
    TABLE_HEADERS,
    PlaygroundClient,
    ReplyStats,
    SamplingSettings,
    VariantCard,
)

MAX_COMPARE = 4  # compare columns built up front; the selection shows 2..MAX_COMPARE of them
# At most one screen update per this many seconds while streaming: each update re-renders the
# chat in the browser, and a fast server (hundreds of tokens/s) would otherwise keep the page
# too busy to react (to the Stop button, say).
UPDATE_EVERY_S = 0.08
DEFAULT_PORT = 7860


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise DeltahubError("the playground needs gradio: pip install 'deltahub[ui]'") from e
    return gr


# ----------------------------------------------------------------------------- pure helpers


def note_text(turn: dict[str, Any]) -> str:
    """The line under a reply: variant and timings, or the error, and whether it was stopped."""
    if turn.get("failed"):
        return f"⚠️ {turn['note']}"
    return f"{turn.get('note', '')} · stopped" if turn.get("stopped") else turn.get("note", "")


def chat_view(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chatbot messages for ``turns``: each reply followed by its note (variant, timings, error)."""
    out = []
    for t in turns:
        content = t["content"]
        if t["role"] == "assistant":
            if t.get("failed"):
                content = note_text(t)
            elif t.get("note"):
                content = f"{content}\n\n<sub>{note_text(t)}</sub>".lstrip()
        out.append({"role": t["role"], "content": content})
    return out


def request_messages(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation sent to the server: failed exchanges left out."""
    return [{"role": t["role"], "content": t["content"]} for t in turns if not t.get("failed")]


def _cold(cards: list[VariantCard], name: str) -> bool | None:
    for c in cards:
        if c.name == name:
            return None if c.warm is None else not c.warm
    return None


def _status_line(client: PlaygroundClient, cards: list[VariantCard] | None, err: Exception | None) -> str:
    if err is not None:
        return f"⚠️ **{err}**"
    n = len([c for c in cards or [] if c.kind != "base"])
    base = next((c.name for c in cards or [] if c.kind == "base"), None)
    return f"Connected to `{client.server_url}` · base `{base or '?'}` · {n} variant(s)"


def _settings(system: str, temperature: float, top_p: float, max_tokens: float) -> SamplingSettings:
    return SamplingSettings(temperature=float(temperature), top_p=float(top_p),
                            max_tokens=max(1, int(max_tokens)), system_prompt=system or "")


# ----------------------------------------------------------------------------- the app


def build_app(server_url: str, api_key: str | None = None, *, title: str = "deltahub playground"):
    """The playground as a ``gr.Blocks`` bound to the server at ``server_url``."""
    gr = _import_gradio()
    client = PlaygroundClient(server_url, api_key)

    async def list_variants() -> tuple[list[VariantCard], Exception | None]:
        try:
            return await client.variants(), None
        except RemoteServerError as e:
            return [], e

    async def refresh(current: str | None, selected: list[str] | None):
        cards, err = await list_variants()
        choices = [(c.label(), c.name) for c in cards]
        names = [c.name for c in cards]
        value = current if current else (names[0] if names else None)
        picked = [s for s in selected or [] if s in names] or names[:2]
        return (gr.update(choices=choices, value=value), gr.update(choices=choices, value=picked),
                [c.row() for c in cards], _status_line(client, cards, err))

    async def respond(message, turns, variant, system, temperature, top_p, max_tokens):
        turns = list(turns or [])
        if not (message or "").strip():
            yield gr.skip(), turns, chat_view(turns), "Type a message first."
            return
        if not variant:
            yield gr.skip(), turns, chat_view(turns), "⚠️ Pick a variant first (is the server up?)."
            return
        if turns and turns[-1]["role"] == "assistant" and not turns[-1].get("done"):
            yield gr.skip(), turns, chat_view(turns), "A reply is still streaming: wait for it or press Stop."
            return
        turns.append({"role": "user", "content": message, "done": True})
        reply = {"role": "assistant", "content": "", "variant": variant, "note": f"{variant} · waiting…"}
        turns.append(reply)
        yield "", turns, chat_view(turns), reply["note"]
        cards, _ = await list_variants()
        shown = 0.0
        try:
            async for text, stats in client.stream_chat(variant, request_messages(turns[:-1]),
                                                        _settings(system, temperature, top_p, max_tokens),
                                                        cold=_cold(cards, variant)):
                reply["content"] += text
                reply["note"] = stats.summary()
                if reply.get("stopped"):  # Stop pressed: leaving the loop closes the stream
                    break
                # ("" is the end of the stream, shown below with the final stats)
                if text and time.monotonic() - shown >= UPDATE_EVERY_S:
                    shown = time.monotonic()
                    yield gr.skip(), turns, chat_view(turns), f"{reply['note']} · streaming…"
        except RemoteServerError as e:
            reply.update(failed=True, note=str(e))
            turns[-2]["failed"] = True
        except asyncio.CancelledError:  # Stop (or the page went away): mark_stopped shows it
            reply["stopped"] = True
            raise
        finally:
            reply["done"] = True  # whatever happened, the chat takes new messages again
        yield gr.skip(), turns, chat_view(turns), note_text(reply)

    def mark_stopped(turns):
        # In place: the running `respond` holds the same dicts, sees the flag and stops too (the
        # event is also cancelled; whichever comes first closes the stream).
        turns = turns or []
        last = turns[-1] if turns else {}
        if last.get("role") == "assistant" and (not last.get("done") or last.get("stopped")):
            last.update(stopped=True, done=True)
            return turns, chat_view(turns), note_text(turns[-1])
        return turns, chat_view(turns), gr.skip()

    def clear():
        return [], [], ""

    def show_columns(selected):
        selected = list(selected or [])[:MAX_COMPARE]
        updates = []
        for i in range(MAX_COMPARE):
            name = selected[i] if i < len(selected) else None
            updates += [gr.update(visible=name is not None), f"### {name}" if name else ""]
        return updates

    async def compare(prompt, selected, flag, system, temperature, top_p, max_tokens):
        flag["stop"] = False  # set in place by the Stop button (as is a cancel of this event)
        selected = list(selected or [])[:MAX_COMPARE]
        replies = [""] * MAX_COMPARE
        notes = [""] * MAX_COMPARE

        def frame(status):
            return [*replies, *notes, status]

        if len(selected) < 1 or not (prompt or "").strip():
            yield frame("Pick variants and type a prompt.")
            return
        cards, err = await list_variants()
        if err is not None:
            yield frame(f"⚠️ {err}")
            return
        settings = _settings(system, temperature, top_p, max_tokens)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, name: str) -> None:
            try:
                async for text, stats in client.stream_chat(name, [{"role": "user", "content": prompt}],
                                                            settings, cold=_cold(cards, name)):
                    await queue.put((i, text, stats, None))
            except (DeltahubError, OSError) as e:  # shown in its column, the others go on
                await queue.put((i, "", None, e))
            finally:
                await queue.put((i, None, None, None))

        for i, name in enumerate(selected):
            notes[i] = f"{name} · waiting…"
        yield frame(f"Streaming {len(selected)} variants…")
        tasks = [asyncio.create_task(pump(i, name)) for i, name in enumerate(selected)]
        try:
            running, shown, dirty = len(tasks), 0.0, False
            while running:
                wait = max(0.0, UPDATE_EVERY_S - (time.monotonic() - shown)) if dirty else None
                try:
                    batch = [await asyncio.wait_for(queue.get(), wait)]
                except asyncio.TimeoutError:
                    batch = []
                while not queue.empty():
                    batch.append(queue.get_nowait())
                dirty = dirty or bool(batch)
                for i, text, stats, error in batch:
                    if text is None:
                        running -= 1
                    elif error is not None:
                        notes[i] = f"⚠️ {error}"
                    else:
                        replies[i] += text
                        notes[i] = f"{_note(stats)} · streaming…" if text else _note(stats)
                if flag["stop"]:
                    break
                if dirty and (not running or time.monotonic() - shown >= UPDATE_EVERY_S):
                    shown, dirty = time.monotonic(), False
                    yield frame(f"Streaming {running} of {len(selected)} variants…" if running else "Done.")
            if flag["stop"]:
                yield frame("Stopped.")
        finally:
            for t in tasks:  # stop button / closed page: closing the streams aborts them on the server
                t.cancel()

    def stop_compare(flag):
        flag["stop"] = True
        return "Stopped."

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nServer: `{client.server_url}` — full fine-tunes served as compressed "
                    "deltas (and LoRAs) over one resident base.")
        status = gr.Markdown("Connecting…", elem_id="server-status")
        with gr.Accordion("Sampling", open=False, elem_id="sampling"):
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top-p")
                max_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens",
                                       elem_id="max-tokens")
            system = gr.Textbox(label="System prompt", lines=2, placeholder="(none)", elem_id="system-prompt")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    variant = gr.Dropdown(label="Variant", choices=[], allow_custom_value=True, scale=5,
                                          info="any name the server knows, or a Hub id if it loads them",
                                          elem_id="variant")
                    refresh_btn = gr.Button("↻ Refresh", scale=0, min_width=120, size="sm", elem_id="refresh")
                turns = gr.State([])
                chatbot = gr.Chatbot(label="Conversation", height=420, feedback_options=None,
                                     elem_id="chatbot")
                with gr.Row():
                    message = gr.Textbox(show_label=False, placeholder="Message (Enter to send)", scale=6,
                                         elem_id="message")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                    clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
                reply_stats = gr.Markdown(elem_id="reply-stats")
            with gr.Tab("Compare", id="compare"):
                with gr.Row(equal_height=True):
                    picked = gr.Dropdown(label=f"Variants to compare (up to {MAX_COMPARE})", choices=[],
                                         multiselect=True, max_choices=MAX_COMPARE, scale=5,
                                         elem_id="compare-variants")
                with gr.Row():
                    prompt = gr.Textbox(show_label=False, placeholder="One prompt for every variant", scale=6,
                                        elem_id="compare-prompt")
                    run_cmp = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-run")
                    stop_cmp = gr.Button("Stop", variant="stop", scale=1, elem_id="compare-stop")
                compare_status = gr.Markdown(elem_id="compare-status")
                columns, headers, replies, notes = [], [], [], []
                with gr.Row():
                    for i in range(MAX_COMPARE):
                        with gr.Column(visible=False, min_width=200, elem_id=f"compare-col-{i}") as col:
                            headers.append(gr.Markdown(elem_id=f"compare-head-{i}"))
                            replies.append(gr.Textbox(show_label=False, lines=8, max_lines=20,
                                                      interactive=False, elem_id=f"compare-reply-{i}"))
                            notes.append(gr.Markdown(elem_id=f"compare-note-{i}"))
                        columns.append(col)
            with gr.Tab("Variants", id="variants"):
                table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True,
                                     elem_id="variants-table")

        refresh_outputs = [variant, picked, table, status]
        demo.load(refresh, [variant, picked], refresh_outputs)
        refresh_btn.click(refresh, [variant, picked], refresh_outputs)

        chat_inputs = [message, turns, variant, system, temperature, top_p, max_tokens]
        chat_outputs = [message, turns, chatbot, reply_stats]
        chat_events = [
            trigger(respond, chat_inputs, chat_outputs, concurrency_limit=None, show_progress="hidden")
            for trigger in (send.click, message.submit)
        ]
        for ev in chat_events:  # labels follow the tiers: a variant just used is warm now
            ev.then(refresh, [variant, picked], refresh_outputs, show_progress="hidden")
        stop.click(mark_stopped, [turns], [turns, chatbot, reply_stats], cancels=chat_events)
        clear_btn.click(clear, None, [turns, chatbot, reply_stats], cancels=chat_events)

        col_outputs = [x for pair in zip(columns, headers, strict=True) for x in pair]
        picked.change(show_columns, [picked], col_outputs, show_progress="hidden")
        cmp_flag = gr.State({"stop": False})
        cmp_inputs = [prompt, picked, cmp_flag, system, temperature, top_p, max_tokens]
        cmp_outputs = [*replies, *notes, compare_status]
        cmp_events = [
            trigger(compare, cmp_inputs, cmp_outputs, concurrency_limit=None, show_progress="hidden")
            for trigger in (run_cmp.click, prompt.submit)
        ]
        for ev in cmp_events:
            ev.then(refresh, [variant, picked], refresh_outputs, show_progress="hidden")
        stop_cmp.click(stop_compare, [cmp_flag], [compare_status], cancels=cmp_events)
    return demo


def _note(stats: ReplyStats | None) -> str:
    return stats.summary() if stats is not None else ""


def launch(server_url: str, api_key: str | None = None, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
           block: bool = True, quiet: bool = False):
    """Serve the playground at ``http://host:port``. ``block=False`` returns at once; the returned
    ``gr.Blocks`` has ``.local_url`` and ``.close()``."""
    demo = build_app(server_url, api_key)
    demo.queue(default_concurrency_limit=None)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet,
                show_error=True, inbrowser=False, share=False)
    return demo
