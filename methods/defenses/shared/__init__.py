"""What several defenses share and none of them is: the run plumbing and final result (common), attention
maps and their losses (attention, for NAD and ARGD), the fine-tuning and distillation stages (distill), the
defender's canary backdoor (canary) and MixMatch (mixmatch, for ASD). Every module one level up is a method."""
