"""A local Stripe stand-in for the usage-billing meter APIs (v2 meter event stream, v1 meters).

It follows the fact sheet in ``STRIPE_FACTS.md`` so the emitter and reconciliation can be tested
against the official SDK without network access, and it adds knobs (faults, clock offset,
duplicate answers, silent loss) that the real service cannot be asked for.
"""

from consumer.local.emulator.server import EmulatorServer, main, serve
from consumer.local.emulator.state import EmulatorOptions, State

__all__ = ["EmulatorOptions", "EmulatorServer", "State", "main", "serve"]
