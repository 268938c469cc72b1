"""The annotation loop: when to train (the decision, the project lock, acceptance) and the RQ
jobs that follow a webhook to a run, a published version and a re-scored queue.
"""
