"""The call kernel: one chat call, whoever makes it, with no HTTP in sight.

`run_call(kernel, request, caller) -> CallResult` and `stream_call(...) -> CallStream` run the
same steps — resolve → admit → compose → hooks and moderation → reserve (`prepare`) → execute
(routing and fallbacks, then the tool loop: each step reserved, settled and logged with its
step number) → output (validate, heal, re-ask) → settle. A stream is returned only once its
first provider event is in: anything that fails before it raises (the adapter answers with a
plain error); anything after it is a `CallError` event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aivax.errors import AppError, BadRequest
from aivax.inference.accumulate import Accumulator, is_content
from aivax.inference.caller import Caller
from aivax.inference.errors import client_error
from aivax.inference.events import (
    CallDone,
    CallError,
    CallEvent,
    CallResult,
    ContentDelta,
    Finished,
    OutputDocument,
    OutputOutcome,
    ToolActivity,
    Usage,
)
from aivax.inference.execute import finish, open_stream
from aivax.inference.extensions import CheckedOutput, ToolCall
from aivax.inference.kernel import Kernel
from aivax.inference.prepare import PreparedCall, continue_call, prepare
from aivax.inference.schemas import ChatCompletionRequest
from aivax.providers.base import StreamEvent, ToolCallDelta, UpstreamError

MAX_TOOL_STEPS = 8  # model requests in one turn's tool loop


@dataclass
class Turn:
    """The model requests of one answer: one, or several when the model calls server-side
    tools. `call` and `accumulator` are the last step's."""

    call: PreparedCall
    accumulator: Accumulator = field(default_factory=Accumulator)
    usage: Usage = field(default_factory=Usage)
    cost: int | None = None
    activity: list[ToolActivity] = field(default_factory=list)

    def settled(self) -> None:
        """Count the last step (settled) into the turn's usage and cost."""
        call, usage = self.call, self.accumulator.usage
        self.usage += Usage(
            call.input_tokens,
            call.output_tokens,
            usage.cached_input_tokens if usage else 0,
            usage.reasoning_tokens if usage else 0,
            call.estimated,
        )
        if call.cost_micros is not None:
            self.cost = (self.cost or 0) + call.cost_micros

    def result(
        self, *, total: int | None = None, output: OutputOutcome | None = None
    ) -> CallResult:
        call, accumulator = self.call, self.accumulator
        message = accumulator.message()
        calls = message.get("tool_calls") or []
        options = call.request.aivax
        return CallResult(
            request_id=call.request_id,
            model=call.model.id,
            requested_model=call.requested_model,
            gateway_id=call.gateway_id,
            content=message["content"],
            reasoning=message.get("reasoning_content"),
            tool_calls=[
                ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls
            ],
            finish_reason=accumulator.final_finish_reason(),
            usage=self.usage,
            cost_micros=self.cost,
            total_cost_micros=(self.cost or 0) if total is None else total,
            steps=call.steps.taken,
            max_tokens=call.admission.max_tokens,
            headers=call.admission.headers,
            truncation=call.truncation,
            retrieval=call.retrieval,
            include_retrieval=options is not None and options.include_retrieval,
            output=output,
            tool_activity=self.activity,
        )


async def run_call(kernel: Kernel, request: ChatCompletionRequest, caller: Caller) -> CallResult:
    """One whole non-streamed call: every model request of it reserved, settled and logged."""
    call = await prepare(kernel, caller, request)
    turn = await _run_turn(call)
    if call.output is None:
        result = turn.result()
    else:
        result = await _checked(kernel, caller, request, turn)
    await _response_hooks(kernel, turn.call, result)
    return result


async def _step(call: PreparedCall, accumulator: Accumulator) -> None:
    """One model request, run to its end and settled, whatever happens."""
    status = 499  # unless the call completes or fails upstream
    code: str | None = "cancelled"
    try:
        async for _ in open_stream(call, accumulator):
            pass
        status, code = 200, None
    except UpstreamError as exc:
        error = client_error(exc, call.model)
        status, code = error.status, error.instance_code
        raise error from exc
    finally:
        await finish(call, accumulator, status=status, error_code=code)


async def _run_turn(call: PreparedCall) -> Turn:
    """The execute step's loop: while the model calls server-side tools (and only those), run
    them, append the exchange and call the model again."""
    turn = Turn(call)
    while True:
        await _step(turn.call, turn.accumulator)
        turn.settled()
        calls = server_tool_calls(turn.call, turn.accumulator)
        if not calls or turn.call.steps.taken >= MAX_TOOL_STEPS:
            return turn
        turn.call = await _tool_step(turn, calls)
        turn.accumulator = Accumulator()


def server_tool_calls(call: PreparedCall, accumulator: Accumulator) -> list[ToolCall]:
    """The tool calls of a step when every one of them is a server-side tool (a call that
    names one of the caller's own tools goes back to the caller, as it is)."""
    if not call.tools or not accumulator.tool_calls:
        return []
    calls = [
        ToolCall(parts.id or f"call_{index}", parts.name, parts.arguments)
        for index, parts in sorted(accumulator.tool_calls.items())
    ]
    return calls if all(c.name in call.tools for c in calls) else []


async def _tool_step(turn: Turn, calls: list[ToolCall]) -> PreparedCall:
    """Run the step's tool calls and prepare the next model request with their results."""
    call = turn.call
    view = call.view()
    exchange: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "content": "".join(turn.accumulator.text) or None,
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ],
        }
    ]
    for tool_call in calls:
        result = await call.tools[tool_call.name].execute(view, tool_call)
        turn.activity.append(ToolActivity(call.steps.taken, tool_call, result))
        exchange.append({"role": "tool", "tool_call_id": tool_call.id, "content": result.content})
    return await continue_call(call, exchange)


async def _checked(
    kernel: Kernel, caller: Caller, request: ChatCompletionRequest, turn: Turn
) -> CallResult:
    """Validate and heal the answer; re-ask (each a full call, reserved, billed and logged as
    the next step of the same request) until valid or out of attempts."""
    plan = turn.call.output
    assert plan is not None  # noqa: S101 - the caller checked
    checked = plan.check("".join(turn.accumulator.text))
    attempts, total = 1, turn.cost or 0
    messages = [m.model_dump(exclude_none=True) for m in request.messages]
    while not checked.valid and attempts <= plan.max_attempts:
        messages = plan.reask(messages, checked)
        retry = ChatCompletionRequest.model_validate(
            {**request.model_dump(exclude_none=True, by_alias=True), "messages": messages}
        )
        call = await prepare(kernel, caller, retry, steps=turn.call.steps, first=False)
        turn = await _run_turn(call)
        total += turn.cost or 0
        attempts += 1
        checked = plan.check("".join(turn.accumulator.text))
    if not checked.valid:
        raise plan.failure(checked)
    return turn.result(total=total, output=_outcome(plan.report(checked, attempts), checked))


def _outcome(report: dict[str, Any], checked: CheckedOutput) -> OutputOutcome:
    return OutputOutcome(checked.document, report, list(checked.steps), report["attempts"])


async def _response_hooks(kernel: Kernel, call: PreparedCall, result: CallResult) -> None:
    hooks = kernel.extensions.hooks
    if hooks:
        view = call.view()
        for hook in hooks:
            await hook.response(view, result)


async def stream_call(kernel: Kernel, request: ChatCompletionRequest, caller: Caller) -> CallStream:
    """A streamed call, returned once the provider's first event is in (or it ended)."""
    if request.json_only:
        raise BadRequest(
            "json_only returns one JSON document; it cannot be streamed.", param="json_only"
        )
    call = await prepare(kernel, caller, request)
    accumulator = Accumulator()
    events = open_stream(call, accumulator)
    try:
        first: StreamEvent | None = await anext(events)
    except StopAsyncIteration:
        first = None
    except UpstreamError as exc:
        error = client_error(exc, call.model)
        await finish(call, accumulator, status=error.status, error_code=error.instance_code)
        raise error from exc
    except BaseException:
        await finish(call, accumulator, status=499, error_code="cancelled")
        raise
    return CallStream(kernel, Turn(call, accumulator), first, events)


class CallStream:
    """The events of a streamed call. `headers`, `request_id`, `model` and the retrieval
    report are known before the first event; iterate once."""

    def __init__(
        self,
        kernel: Kernel,
        turn: Turn,
        first: StreamEvent | None,
        events: AsyncIterator[StreamEvent],
    ) -> None:
        self.kernel = kernel
        self.turn = turn
        self.first = first
        self.events = events
        call = turn.call
        self.headers = call.admission.headers
        self.request_id = call.request_id
        self.model = call.requested_model or call.model.id
        options = call.request.aivax
        self.retrieval = (
            call.retrieval if options is not None and options.include_retrieval else None
        )
        self.include_retrieval = options is not None and options.include_retrieval
        self.include_usage = call.request.include_usage
        self.opens_with_content = first is not None and is_content(first)

    def __aiter__(self) -> AsyncIterator[CallEvent]:
        return self._run()

    async def _run(self) -> AsyncIterator[CallEvent]:
        status = 499  # unless the call ends below
        code: str | None = "client_disconnected"
        try:
            if self.turn.call.tools:
                async for event in self._turn():
                    yield event
            else:  # the common case, without a generator per chunk in between
                if isinstance(self.first, ContentDelta):
                    yield self.first
                async for provided in self.events:
                    if isinstance(provided, ContentDelta):
                        yield provided
            yield Finished(self.turn.accumulator.final_finish_reason())
            output = self._output()
            if output is not None:
                yield output
            status, code = 200, None
            await self._settle(200, None)
            result = self.turn.result()
            await _response_hooks(self.kernel, self.turn.call, result)
            yield CallDone(result)
        except UpstreamError as exc:
            error: AppError = client_error(exc, self.turn.call.model)
            status, code = error.status, error.instance_code
            await self._settle(status, code)
            yield CallError(error)
        except AppError as failed:  # the output plan refused the answer, or a later step
            status, code = failed.status, failed.instance_code or failed.code
            await self._settle(status, code)
            yield CallError(failed)
        finally:
            await self._settle(status, code)

    async def _settle(self, status: int, code: str | None) -> None:
        if not self.turn.call.finished:
            await finish(self.turn.call, self.turn.accumulator, status=status, error_code=code)
            self.turn.settled()

    async def _turn(self) -> AsyncIterator[CallEvent]:
        """Content as it comes; with server-side tools offered, tool-call deltas wait for the
        end of their step (the caller never sees a server-side call as its own)."""
        pending: list[ToolCallDelta] = []
        events = self.events
        first = self.first
        while True:
            held = bool(self.turn.call.tools)
            if isinstance(first, ContentDelta):
                if held and isinstance(first, ToolCallDelta):
                    pending.append(first)
                else:
                    yield first
            async for event in events:
                if held and isinstance(event, ToolCallDelta):
                    pending.append(event)
                elif isinstance(event, ContentDelta):
                    yield event
            calls = server_tool_calls(self.turn.call, self.turn.accumulator)
            if not calls or self.turn.call.steps.taken + 1 >= MAX_TOOL_STEPS:
                for delta in pending:
                    yield delta
                return
            pending.clear()
            await self._settle(200, None)
            activity = len(self.turn.activity)
            self.turn.call = await _tool_step(self.turn, calls)
            for done in self.turn.activity[activity:]:
                yield done
            self.turn.accumulator = Accumulator()
            events, first = open_stream(self.turn.call, self.turn.accumulator), None

    def _output(self) -> OutputDocument | None:
        """Streams are healed locally at the end (no re-ask): the checked document, or the
        plan's failure raised."""
        plan = self.turn.call.output
        if plan is None:
            return None
        checked = plan.check("".join(self.turn.accumulator.text))
        if not checked.valid:
            raise plan.failure(checked)
        return OutputDocument(checked.document, plan.report(checked, 1))
