"""Speculative decoding: proposers that draft tokens for the target model to verify in one forward.

The scheduler reserves KV slots for a decoding sequence's drafts (``DraftPlanner``), the proposer
fills them in before the step runs, the model runner verifies them
(``quire.sampling.rejection_sampler``) and the scheduler gives back the slots of rejected ones.
"""
