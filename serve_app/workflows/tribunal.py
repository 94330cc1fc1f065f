"""The tribunal: a panel of models drafts, a judge critiques, the panel revises, the
judge answers.

One request to the workflow's name runs:

1. every member drafts an answer to the conversation, all at once;
2. the judge reads the question and the drafts and writes a critique of each and a
   verdict;
3. for each further round, the members revise their own drafts given the critique,
   at once, and the judge critiques again;
4. the judge writes the final answer from the last drafts and critique: the step the
   client receives as it is generated.

A member whose step fails is left out of the panel from then on, and the judge is
told, as long as one member remains; a judge step that fails fails the request (503
naming the step).  The client's sampling options (and ``max_tokens``) apply to the
final step; the intermediate steps use ``steps`` and each participant's own
temperature and seed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from pydantic import Field, field_validator

from serve_app.errors import APIError
from serve_app.protocol import GenerateDelta, GenerateRequest, SamplingParams
from serve_app.workflows.base import (
    Participant,
    ParticipantSpec,
    TRACE_OPTION,
    Run,
    StepFailed,
    StepSampling,
    UsageSink,
    Workflow,
    WorkflowConfig,
    _Strict,
    check_template,
    step_failure,
)

CRITIQUE = """You are the judge of a panel that answered the question below. Critique \
each answer in turn: what is right, what is wrong or missing. End with a verdict: which \
answer is best, and what a final answer must fix.

Question:
{question}

{drafts}
{notes}"""

REVISE = """Question:
{question}

Your previous answer:
{draft}

A judge reviewed the panel's answers (yours is answer {number}):
{critique}

Write an improved answer to the question. Reply with the answer only."""

FINAL = """You are the judge of a panel. From the panel's answers and your critique of \
them, write the best answer to the question, addressed to the person who asked. Reply \
with the answer only.

Question:
{question}

{drafts}
{notes}
Your critique:
{critique}"""

DRAFT_HEADING = "Answer {number}:\n{text}"
NOTE = ("Note: {missing} of the panel's {size} answers are missing: their models "
        "failed ({who}).\n")

DEFAULTS = {"critique": CRITIQUE, "revise": REVISE, "final": FINAL}
_PLACEHOLDERS = {
    "critique": ("question", "drafts", "notes", "round"),
    "revise": ("question", "draft", "critique", "number", "round"),
    "final": ("question", "drafts", "notes", "critique"),
}


class TribunalPrompts(_Strict):
    """The prompt of each step, as ``str.format`` templates (a literal brace: ``{{``);
    null: the built-in one (docs/workflows.md).

    ``{question}`` is the conversation (a lone user message: its text; otherwise each
    message as ``Role: text``); ``{drafts}`` the panel's answers, numbered;
    ``{notes}`` says which members failed (empty when none did); ``{draft}`` and
    ``{number}`` a member's own answer and its number; ``{round}`` counts from 1."""

    draft_system: str | None = Field(default=None, description=(
        "a system message put first in the members' steps (drafts and revisions); "
        "null: drafts get the conversation exactly as the client sent it"))
    critique: str | None = Field(default=None, description=(
        "the judge's critique and verdict: {question}, {drafts}, {notes}, {round}"))
    revise: str | None = Field(default=None, description=(
        "a member's revision: {question}, {draft}, {number}, {critique}, {round}"))
    final: str | None = Field(default=None, description=(
        "the judge's final answer: {question}, {drafts}, {notes}, {critique}"))

    @field_validator("critique", "revise", "final")
    @classmethod
    def _placeholders(cls, value: str | None, info) -> str | None:
        return None if value is None else check_template(value, _PLACEHOLDERS[info.field_name])

    def template(self, step: str) -> str:
        return getattr(self, step) or DEFAULTS[step]


class TribunalConfig(WorkflowConfig):
    """``kind: tribunal``: members draft, the judge critiques, members revise, the
    judge answers (docs/workflows.md)."""

    kind: Literal["tribunal"]
    members: list[ParticipantSpec] = Field(min_length=1, description=(
        "the panel: each a model name or {model, temperature, seed, max_tokens}; a "
        "model may appear several times, sampled differently"))
    judge: ParticipantSpec = Field(description=(
        "a model name or {model, temperature, seed, max_tokens}; writes the critiques "
        "and the final answer"))
    rounds: int = Field(default=1, ge=1, le=10, description=(
        "critiques by the judge; before each one after the first the members revise"))
    steps: StepSampling = Field(default_factory=StepSampling, description=(
        "sampling of the drafts, critiques and revisions"))
    member_retries: int = Field(default=0, ge=0, description=(
        "engine calls of a member retried on another replica before it is left out "
        "(0: a member whose replica fails is left out at once; judge steps use the "
        "app's max_retries)"))
    prompts: TribunalPrompts = Field(default_factory=TribunalPrompts)

    def model_fields_used(self) -> list[tuple[tuple[str | int, ...], str]]:
        return [(("members", i), m.model) for i, m in enumerate(self.members)] + [
            (("judge",), self.judge.model)]

    def required_models(self) -> list[str]:
        return [self.judge.model]

    def final_model(self) -> str:
        return self.judge.model

    def panel_models(self) -> list[str]:
        return [m.model for m in self.members]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "members": [m.model for m in self.members],
                "judge": self.judge.model, "rounds": self.rounds}


def conversation(req: GenerateRequest) -> list[dict[str, str]]:
    """The client's request as chat messages (a completions prompt: one user message)."""
    if req.messages is not None:
        return [{"role": m.role, "content": m.text()} for m in req.messages]
    return [{"role": "user", "content": req.prompt or ""}]


def question_text(messages: list[dict[str, str]]) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


class Tribunal(Workflow):
    kind = "tribunal"
    Config = TribunalConfig
    config: TribunalConfig

    def _sampling(self, who: Participant) -> SamplingParams:
        s = self.config.steps
        return SamplingParams(max_tokens=who.max_tokens or s.max_tokens, top_p=s.top_p,
                              seed=who.seed,
                              ignore_eos=s.ignore_eos,
                              temperature=s.temperature if who.temperature is None
                              else who.temperature)

    async def run(self, req: GenerateRequest, on_usage: UsageSink | None = None
                  ) -> AsyncIterator[list[GenerateDelta]]:
        cfg, template = self.config, self.config.prompts.template
        run = Run(self, req, on_usage)
        messages = conversation(req)
        question = question_text(messages)
        system = ([] if cfg.prompts.draft_system is None
                  else [{"role": "system", "content": cfg.prompts.draft_system}])
        panel: dict[int, str] = {}   # member index -> its latest answer
        failed: dict[int, str] = {}  # member index -> why it was left out

        async def member_step(i: int, name: str, round_: int, msgs: list) -> None:
            who = cfg.members[i]
            step = run.step(name, round_, "member", who, member=i)
            try:
                panel[i] = await run.complete(
                    step, run.request(step, who, [*system, *msgs], self._sampling(who)),
                    cfg.member_retries)
            except StepFailed as err:
                panel.pop(i, None)
                failed[i] = err.message

        async def judge_step(name: str, round_: int, prompt: str) -> str:
            step = run.step(name, round_, "judge", cfg.judge)
            msgs = [{"role": "user", "content": prompt}]
            try:
                return await run.complete(
                    step, run.request(step, cfg.judge, msgs, self._sampling(cfg.judge)), None)
            except StepFailed as err:
                raise step_failure(cfg, err, f"step '{name}' (round {round_}, judge "
                                   f"'{cfg.judge.model}')") from None

        await run.parallel([member_step(i, "draft", 1, messages)
                            for i in range(len(cfg.members))])
        critique = ""
        for round_ in range(1, cfg.rounds + 1):
            if round_ > 1:
                await run.parallel([member_step(i, "revise", round_, [
                    {"role": "user", "content": template("revise").format(
                        question=question, draft=panel[i], critique=critique,
                        number=i + 1, round=round_)}]) for i in sorted(panel)])
            self._need_panel(panel, failed, round_)
            critique = await judge_step("critique", round_, template("critique").format(
                question=question, drafts=self._drafts(panel), notes=self._notes(failed),
                round=round_))

        step = run.step("final", cfg.rounds, "judge", cfg.judge)
        final = template("final").format(question=question, drafts=self._drafts(panel),
                                          notes=self._notes(failed), critique=critique)
        final_req = run.request(step, cfg.judge, [{"role": "user", "content": final}],
                                self._final_sampling(req.sampling))
        final_req.extras = {k: v for k, v in req.extras.items() if k != TRACE_OPTION}
        try:
            async with aclosing(run.final(step, final_req, None)) as stream:
                async for batch in stream:
                    yield batch
        except StepFailed as err:
            raise step_failure(cfg, err, f"step 'final' (judge '{cfg.judge.model}')") \
                from None

    def _final_sampling(self, client: SamplingParams) -> SamplingParams:
        """The client's options; the judge's temperature and seed where it sent none."""
        judge = self.config.judge
        return client.model_copy(update={
            "temperature": judge.temperature if client.temperature is None
            else client.temperature,
            "seed": judge.seed if client.seed is None else client.seed})

    def _need_panel(self, panel: dict[int, str], failed: dict[int, str], round_: int) -> None:
        if not panel:
            why = "; ".join(f"member {i + 1} ('{self.config.members[i].model}'): {m}"
                            for i, m in sorted(failed.items()))
            raise APIError(503, f"The workflow '{self.config.name}' failed in round "
                           f"{round_}: every member of the panel failed ({why}).",
                           type_="server_error", code="workflow_step_failed")

    @staticmethod
    def _drafts(panel: dict[int, str]) -> str:
        return "\n\n".join(DRAFT_HEADING.format(number=i + 1, text=text.strip())
                           for i, text in sorted(panel.items()))

    def _notes(self, failed: dict[int, str]) -> str:
        if not failed:
            return ""
        who = ", ".join(f"answer {i + 1}" for i in sorted(failed))
        return NOTE.format(missing=len(failed), size=len(self.config.members), who=who)
