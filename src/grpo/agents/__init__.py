"""Agents: multi-turn episodes in which the model calls tools or plays an environment.

A tool is the user's Python function (type hints and a Google-style docstring give its JSON schema); an
environment is a class with no constructor arguments, one instance per trajectory, whose ``reset(**row)``
starts an episode, whose public methods are tools, and whose optional ``step(text)`` answers each assistant
turn. This layer loads and checks them (:mod:`.tools`, :mod:`.environments`), reads tool calls in the chat
template's own format (:mod:`.calls`), and runs episodes on top of :mod:`grpo.rollout`; it sits below
training and the CLI and never imports them.
"""
