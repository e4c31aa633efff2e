"""Between a session and its policy: what waits on the clock or on the shared state.

A command policy delays waits at the head of the queue until its time; one
whose decision needs the shared state (an ``Ask``) waits until the shell has
the answer (``Session.answered``), and so does an upstream ``+OK`` to a login
while the per-user cap is asked about.  Either way nothing behind it moves:
the order of replies is the order of commands.  The desk holds that waiting,
so the session only asks "may the queue move?" and "what did policy say?".
"""

from __future__ import annotations

from .events import Event, PolicyDecision
from .policy import Ask, Decision, Delay, Deny, Facts, Note, Policy
from .pop3 import Command, Status
from .session_state import OutputBuilder, Pending

__all__ = ["HeldLogin", "PolicyDesk", "note"]

# An upstream's +OK to a login, held while the shared state is asked.
HeldLogin = tuple[Pending, Status, bytes]


def note(notes: tuple[Note, ...], cmd: Command, out: OutputBuilder) -> None:
    """Record the rules that matched (``policy.decision`` events)."""
    for n in notes:
        out.events.append(PolicyDecision(n.rule, n.action, cmd, n.enforced))


class PolicyDesk:
    __slots__ = ("answer", "asking", "held_login", "held_until", "policy", "wake_at")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.held_until: float | None = None  # a delayed command waits until then
        self.asking = False  # an Ask is out: nothing moves until it is answered
        self.answer: Decision | None = None  # what it came to, for the head command
        self.held_login: HeldLogin | None = None
        self.wake_at: float | None = None  # when the session's tick is due

    def ready(self, now: float) -> bool:
        """May the next command be judged now?"""
        return not self.asking and (self.held_until is None or now >= self.held_until)

    def decide(self, facts: Facts, cmd: Command, now: float) -> Decision | Ask:
        decision = self.answer
        if decision is None:
            return self.policy.decide(facts, cmd, now)
        self.answer = None  # what the shared state said of this command
        return decision

    def hold(self, decision: Delay | Ask, cmd: Command, out: OutputBuilder) -> None:
        """The head command waits: for the clock, or for the shared state."""
        if isinstance(decision, Ask):
            self.asking = True
            out.ask = decision
        else:
            self.held_until = decision.until
            self.wake(decision.until)
            note(decision.notes, cmd, out)

    def passed(self) -> None:
        self.held_until = None

    def wake(self, at: float) -> None:
        self.wake_at = at if self.wake_at is None else min(self.wake_at, at)

    def admit_login(
        self, facts: Facts, user: str | None, held: HeldLogin, out: OutputBuilder, now: float
    ) -> Deny | Ask | None:
        """The upstream accepted a login: may the user have one more session?
        An ``Ask`` holds the ``+OK`` back until ``answered``."""
        verdict = None if user is None else self.policy.admit_login(facts, user, now)
        if isinstance(verdict, Ask):
            self.held_login = held
            self.asking = True
            out.ask = verdict
        return verdict

    def answered(self, decision: Decision) -> HeldLogin | None:
        """The Ask came to ``decision``: the login it held, or kept for the
        head command's next ``decide``."""
        self.asking = False
        held, self.held_login = self.held_login, None
        if held is None:
            self.answer = decision
        return held

    def observe(self, facts: Facts, event: Event, now: float, out: OutputBuilder) -> None:
        effect = self.policy.observe(facts, event, now)
        if effect is not None:
            out.effects.append(effect)
