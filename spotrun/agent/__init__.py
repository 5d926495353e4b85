"""The Agent: runs on each instance (or as a local-provider process), see `spotrun.agent.main`.

Kept import-light: notice watchers and the launcher import this package.
"""
