"""Policies: one room per policy (config model, name, order, hooks). See base.py for the contract."""
