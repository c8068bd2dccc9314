"""How an item ends when it does not become a record. The runner counts each by its `reason`:

  Rejected     dropped on purpose (an invalid reply repair could not fix, a plan too short, a judge verdict
               that disagrees, a sampled stream that broke the format, ...): counted under `rejected`.
  CallFailed   a call failed for good (retries outlived): counted under `failed`; a re-run retries the item.
  FatalError   stop the run (bad credentials, unknown model, a backend that cannot work).
  InvalidReply a reply that does not parse or validate (counted under `invalid`; repaired or Rejected).

The classes are the endpoint client's (`common/endpoint.py`): a call ends in the same ways.
"""

from common.endpoint import CallFailed, FatalError, InvalidReply, Rejected

__all__ = ["CallFailed", "FatalError", "InvalidReply", "Rejected"]
