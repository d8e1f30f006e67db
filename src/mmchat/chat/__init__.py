"""Conversations: chat templates, sessions, stores, presets."""
