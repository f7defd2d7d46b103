"""CoRD's integration baseline (paper 002, Table 17): the prompt a separate LLM gets to merge the curation
traces into one structured JSON, and reading its answer back into ``<think>`` steps and an answer."""

from __future__ import annotations

import json
import re

# CoRD Table 17, verbatim but for the two placeholders (the teachers' traces go in <reasoning_step_i> tags).
INTEGRATION_PROMPT = """Instruction

You are tasked with analyzing multiple reasoning solutions and integrating them into a single, structured JSON output.

1. Integrate All Reasoning
- The reasoning steps are provided inside XML tags such as:
<reasoning_step_1> ... </reasoning_step_1>
<reasoning_step_2> ... </reasoning_step_2>
- Merge the content inside all these XML tags into one unified reasoning flow.
- Combine them carefully while maintaining logical flow and context.

2. Assign IDs
- Each sub-thinking process should have its own unique ID.
- Use a hierarchy such as:
"integrated_step1", "integrated_step2" for overall stages of integrated reasoning.
"answer_part" for the final answer section and use `\\boxed{{ }}` format for the final answer.

3. Categorize Reasoning Patterns
Categorize the reasoning according to its type to ensure effective integration:
- Progressive Reasoning: Logical, forward-moving step-by-step problem solving.
Indicators: "Let's solve", "First", "Next", "Then", "Therefore", "We need to", "Given that".
- Verification: Returning to check previous steps for accuracy.
Indicators: "Wait", "Let me check", "Let me verify", "Double-check", "Going back to".
- Multi-method Validation: Using different methods or perspectives to confirm a conclusion.
Indicators: "Alternatively", "Another way", "Let's try a different approach", "Using another method".
- Error Correction Pattern: Identifying and fixing mistakes in reasoning.
Indicators: "This is wrong", "The mistake was", "This can't be right", "The error is", "This contradicts".

4. Return Your Integration in JSON Format
Provide your integrated reasoning in the following JSON structure:
{{
  "integrated_step1": {{"content": "### Step 1. <integrated reasoning text>", "category": "<reasoning pattern>"}},
  "integrated_step2": {{"content": "### Step 2. <integrated reasoning text>", "category": "<reasoning pattern>"}},
  ...
  "integrated_stepN": {{"content": "### Step N. <integrated reasoning text>", "category": "<reasoning pattern>"}},
  "answer_part": ["<final answer in boxed format>"]
}}

Question: {question}

Reasoning Steps: {traces}"""


def parse_integration(text: str) -> tuple[str, str] | None:
    """(reasoning, answer) from the integrator's JSON (Table 17's shape): the ``integrated_step*`` contents in
    order, and ``answer_part``; None when no such JSON object can be read."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    keys = sorted((k for k in obj if re.fullmatch(r"integrated_step\d+", k)), key=lambda k: int(k[15:]))
    steps = [v.get("content", "") if isinstance(v, dict) else str(v) for v in (obj[k] for k in keys)]
    ans = obj.get("answer_part", "")
    ans = " ".join(map(str, ans)) if isinstance(ans, list) else str(ans)
    return ("\n".join(s.strip() for s in steps if s), ans.strip()) if steps or ans else None
