"""Prompt-shape linter: finds what breaks prefix caching in a request trace and
simulates the hit rate that fixing it would give (``segcache lint FILE...``).

No torch and no model: it reuses ``segcache.kv.autoseg``, ``kv.hashing``,
``kv.partial`` and ``kv.chunking`` so its verdicts match the server's, and the HF
``tokenizers`` library for counts.

- ``trace``: accepted input shapes, units of a request
- ``rules_prompt`` / ``rules_conversation`` / ``rules_traffic`` /
  ``rules_frameworks`` (what LangGraph, CrewAI, the Agents SDK send): the rules
- ``simulate``: plain prefix cache vs segcache (unit walk, partial hits, blending)
- ``analyze``: the two passes; ``report``: terminal, JSON, HTML; ``cli``
- ``synth``: seeded multi-agent traces with planted defects (tests, demos)
"""
