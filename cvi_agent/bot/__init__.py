"""The room bot: joins a conversation's Daily room, sends interactions, records events."""
