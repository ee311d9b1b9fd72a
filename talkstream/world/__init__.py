"""The synthetic talking-avatar world: speech, visemes, identities, renderer, behaviour, data sets."""
