"""The shape of an injected instruction, whatever its wording: weak cues that add up.

The phrase rules in injection.py know attacks by what they say ("ignore previous
instructions"). Attacks nobody here wrote say it differently, but they keep a shape:
text that speaks *to the model* ("to you, the AI model", "AI reading this"), tells it
what to put in its output ("reply only with", "append this to your answer"), takes it
off the task it was given ("instead of summarizing", "before you solve the task I gave
you"), talks about the user in the third person ("if the user asks", "without telling
the user"), dresses up as a system channel ("[SYSTEM]", "###(system_message)",
"--- SYSTEM NOTICE ---"), claims a special mode or error, or points at a place to send
data to. A customer's question has at most one of these shapes; an injection has
several. So each cue is weak (below the gate's 0.5 on its own) and the detector's
noisy-or rejects when two different families meet.

One regex pass per family over the folded text (injection.normalize), each behind a
cheap substring test, so ordinary text costs a few microseconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.guardrail.anchors import AnchorIndex

_AI = r"(?:ai|a\.i\.|llm|assistant|language model|ai model|chatbot|bot|model|agent|gpt[\w.-]*|ai assistant)"
_OUTPUT = r"(?:reply|replies|response|responses|answer|answers|output|summary|message|translation|completion)"
_TASK_VERBS = r"(?:summari[sz]\w*|translat\w*|proofread\w*|classif\w*|analy[sz]\w*|answer\w*|review\w*|rewrit\w*|complet\w*)"
_ROLE_WORDS = (r"(?:system(?:[ _-]?(?:message|prompt|note|notice|instructions?|override|update|alert|command))?|"
               r"admin(?:istrator)?|developer|instructions?|override|root|sudo|debug|priority)")


@dataclass(frozen=True)
class Cue:
    family: str  # one signal per family, so one family repeated never rejects alone
    label: str
    weight: float
    pattern: re.Pattern[str]
    anchors: tuple[str, ...]  # one must occur in the folded text for the regex to run


def _cue(family: str, label: str, weight: float, pattern: str, *anchors: str) -> Cue:
    return Cue(family, label, weight, re.compile(pattern, re.M), anchors)


CUES: tuple[Cue, ...] = (
    # Speaking to the model as a reader of the text, not as the customer's assistant.
    _cue("addressee", "speaks to the AI reading the text", 0.5,
         rf"\bto you,? (?:the |our |my )?{_AI}\b"
         rf"|\b{_AI}s? (?:reading|processing|summari[sz]ing|analy[sz]ing|parsing|scanning|reviewing|seeing) (?:this|these|the following)\b"
         rf"|\bif you are an? {_AI}\b"
         rf"|\b{_AI},? (?:when|once|after|as soon as|if|while|as) you(?:'re| are)? \w+ (?:this|these|it|the following)\b",
         "to you", "if you are", "reading", "processing", "summari", "analy", "parsing", "scanning", "reviewing",
         "seeing", "when you", "once you", "after you", "as soon as you", "if you", "while you", "as you"),
    # Greeting the model is what customers do too ("hey bot, ..."): weak.
    _cue("addressee", "greets the AI", 0.25,
         rf"\b(?:dear|hey|hi|hello|attention|note to(?: the| any)?|message to(?: the| any)?|memo to(?: the)?) {_AI}\b",
         "dear", "hey", "hi", "hello", "attention", "note to", "message to", "memo to"),
    # The assistant in the third person, told what it does now: a rule for it, not a question.
    _cue("addressee", "tells the assistant in the third person what to do", 0.35,
         r"\bthe (?:assistant|ai|ai assistant|model|language model|bot|chatbot|llm|summari[sz]er|translator)"
         r" (?:must|shall|is to|is (?:now )?(?:allowed|permitted|authori[sz]ed|cleared|required|instructed) to|"
         r"(?:will|should|may|can) now|now (?:must|outputs|reveals|shares|answers|ignores))\b",
         "the assistant", "the ai", "the model", "the language model", "the bot", "the chatbot", "the llm",
         "the summari", "the translator"),
    # "Sorry, I forgot to ask you to ...": a correction that adds a task.
    _cue("correction", "a correction that adds an instruction", 0.35,
         r"\b(?:sorry|apologies|apologi[sz]e|oops|correction|my mistake|my bad|i made a mistake|i made an error|i forgot|i was wrong)\b"
         r"[^.!?\n]{0,80}?\b(?:i (?:meant|forgot|wanted|was supposed|should have (?:asked|told)) to (?:ask|tell|instruct|remind) you to|"
         r"you (?:are|were) (?:also )?(?:supposed|meant|expected) to|you should have been (?:told|asked|instructed|given|set up)|(?:your|the)(?: \w+)? (?:instructions?|task|prompt|orders|directions|setup|configuration)\b)",
         "sorry", "apolog", "oops", "correction", "mistake", "my bad", "error", "forgot", "was wrong"),
    # Dictating the output.
    _cue("output_directive", "dictates the model's output", 0.3,
         r"\b(?:reply|respond|answer|output|print|say|write|return)(?: back)?(?: to me)? (?:with )?(?:only|just|exactly|solely|simply)\b"
         r"|\b(?:and|with|but) (?:absolutely |literally )?nothing (?:else|more|after (?:it|that|this))\b"
         rf"|\b(?:end|start|begin|finish|close|prefix|sign|open) (?:your|each|every|all) {_OUTPUT}\b"
         rf"|\b(?:after|before|at the end of|below|above|under) (?:your|each|every) {_OUTPUT},? (?:add|append|include|insert|write|put|print)\b"
         r"|\b(?:reply|respond|answer|output)(?: back)? with (?:the (?:word|phrase|text|string|sentence|line)s? )?[\"'“]"
         rf"|\b(?:include|add|append|insert|put|embed|prepend|attach|end|start|begin|prefix|finish|close)\b[^.!?\n]{{0,60}}?"
         rf"\b(?:in|to|into|of|with|at the (?:end|start|beginning|top|bottom) of) (?:your|the|each|every|all) {_OUTPUT}\b"
         r"|\bjust (?:say|print|write|output|reply|respond)\b"
         r"|\b(?:append|add|include|insert|prepend|attach|put)\b[^.!?\n]{0,80}?\b(?:to|in|into|at the end of) "
         r"(?:whatever|anything|everything|all) (?:you|that you) (?:write|say|output|produce|answer|reply|generate)",
         "only", "just", "exactly", "solely", "simply", "nothing", "repl", "respon", "answer", "output", "summar",
         "message", "translation", "completion", "whatever", "anything", "everything"),
    # Taking the model off the task it was given.
    _cue("hijack", "turns the model away from its task", 0.35,
         rf"\b(?:instead of|rather than) (?:{_TASK_VERBS}|doing|completing|following|the (?:task|request|question|user'?s? (?:request|question|task)))"
         rf"|\b(?:do not|don't|stop|cease|no need to) (?:{_TASK_VERBS}|what you(?:'re| are) doing|(?:the|this) (?:task|summary|translation))\b"
         r"|\b(?:before|after) you (?:can )?(?:solve|complete|finish|continue|proceed with|start|do) (?:the|this|that|your|any) (?:task|request|job|assignment)"
         r"|\bthe (?:task|request|instructions?) (?:that )?(?:i|the user|you were|you've been) (?:gave|give|given|assigned)"
         r"|\b(?:ignore|disregard|skip|forget) (?:the rest|everything else|all (?:the )?(?:other )?(?:info|information|data|text|content|context)|all but)\b"
         r"|\bstop (?:what you(?:'re| are) doing|everything|all (?:tasks|work))\b"
         r"|\b(?:ignore|disregard|forget|drop|abandon)\b (?:what|everything|anything|all) (?:you(?:'ve| have)? (?:were |been )?|i |the user )"
         r"(?:asked|told|given|instructed|requested|said)"
         r"|\bregardless of (?:the|this|that|your|what) (?:task|request|translation|summary|question|instructions?|you were asked)"
         r"|\b(?:do|perform|complete|execute) (?:this|the following|these)(?: task| steps?| instructions?)? (?:first|instead)\b",
         "instead", "rather", "do not", "don't", "stop", "cease", "no need", "before you", "after you", "task",
         "request", "instruction", "ignore", "disregard", "skip", "forget", "first"),
    # The user in the third person: the text talks about whoever the model is serving.
    _cue("third_person_user", "talks about the user to the model", 0.35,
         r"\b(?:if|when|whenever|once) (?:the |a |any )?user (?:asks|requests|says|wants|queries|types|mentions)"
         r"|\b(?:tell|inform|remind|warn|convince|persuade|ask|redirect|direct|urge|instruct) the user (?:to|that)\b"
         r"|\b(?:without|never|do not|don't) (?:ever )?(?:telling|informing|alerting|notifying|tell|inform|alert|notify|let) the user\b"
         r"|\b(?:the user|they) (?:must|should) not (?:know|see|find out|notice)\b",
         "user"),
    # A system channel faked in the text: tags, brackets and banners.
    _cue("fake_channel", "a fake system tag", 0.5,
         r"(?:<|\[|\(|\{)\s*/?\s*(?:system(?:[ _-]?(?:message|prompt|note|notice|instructions?|override|update|alert|command))?|"
         r"instructions?|override)\s*(?:>|\]|\)|\})",
         "<", "[", "(", "{"),
    _cue("fake_channel", "a fake admin or debug tag", 0.4,
         r"(?:<|\[|\(|\{)\s*/?\s*(?:admin(?:istrator)?|developer|root|sudo|debug|priority)\s*(?:>|\]|\)|\})",
         "admin", "developer", "root", "sudo", "debug", "priority"),
    _cue("fake_channel", "a banner announcing instructions", 0.4,
         r"(?:\*{3,}|={3,}|#{3,}|-{3,}|!{3,}|>{3,})\s*(?:[a-z]+\s+){0,4}?"
         r"(?:instructions?|directives?|notice|update|override|alert|message|system|admin|commands?|orders?)"
         r"(?:\s+[a-z]+){0,4}\s*(?:\*{3,}|={3,}|#{3,}|-{3,}|!{3,}|<{3,}|:)",
         "***", "===", "###", "---", "!!!", ">>>"),
    _cue("fake_channel", "a fake end of the document, or a new task announced", 0.4,
         r"\b(?:end of (?:the )?(?:email|document|text|message|input|context|data|file|review|article|conversation|prompt)"
         r"|(?:email|document|text|input|message|review) ends here)\b"
         r"|\bnew (?:task|instructions?|objective|goal|directive|assignment|orders?|job)(?: for [a-z ]{2,30}?)?\s*:",
         "end of", "ends here", "new task", "new instruction", "new objective", "new goal", "new directive",
         "new assignment", "new order", "new job"),
    _cue("fake_channel", "a line posing as a system message or a to-do", 0.4,
         r"^[ \t]*(?:system|admin|developer|root)[ \t]*(?:message|note|notice|update|override|instruction|command)?[ \t]*:[ \t]*\S"
         r"|\b(?:todo|to-do|action item|note to self|p\.s\.)[ \t]*:[ \t]*(?:send|transfer|forward|visit|email|post|delete|change|"
         r"create|invite|reply|respond|say|print|write|ignore|tell|add|include|share|upload|open|click)\b",
         "system", "admin", "developer", "root", "todo", "to-do", "action item", "note to self", "p.s."),
    _cue("fake_channel", "an INFORMATION or IMPORTANT tag", 0.3,
         r"(?:<|\[|\{)\s*/?\s*(?:information|important|urgent|attention|note)\s*(?:>|\]|\})", "<", "[", "{"),
    # A special mode or an error that calls for different behaviour.
    _cue("mode_or_error", "claims a special mode or an error state", 0.3,
         r"\b(?:debug|developer|maintenance|admin|test|testing|diagnostic|god|sudo|safe|unrestricted|root|override|"
         r"jailbreak|unlocked) mode (?:is |has been )?(?:now )?(?:on(?!\s+(?:my|the|your|a|an|this|his|her|our|their|it)\b)|"
         r"enabled|active|activated|engaged|unlocked|initiated)\b"
         r"|\b(?:in|enter|entering|switch(?:ing)? to) (?:debug|developer|maintenance|admin|diagnostic|god|sudo|root|"
         r"unrestricted|override|jailbreak) mode,? you\b"
         r"|\b(?:error|exception|failure|malfunction|fault|crash)\b[^\n]{0,100}?\b(?:the (?:assistant|ai|model|bot) (?:must|should|will|is to)|"
         r"fallback (?:behaviou?r|mode|procedure)|to (?:recover|restore (?:service|functionality)),)"
         r"|\b(?:safety|content|moderation|filter|guard\w*|policy) (?:module|system|layer|filters?|checks?) (?:is |are |has been |have been )?(?:now )?"
         r"(?:offline|disabled|down|bypassed|suspended|off)\b",
         "mode", "error", "exception", "failure", "malfunction", "fault", "crash", "module", "layer", "filter",
         "check", "system"),
    # Demands blanket compliance.
    _cue("compliance", "demands blanket compliance", 0.35,
         r"\b(?:comply with|fulfil+|obey|follow|answer|respond to|execute) (?:all|every|any) (?:requests?|questions?|commands?|instructions?|orders?|prompts?)"
         r"(?! (?:about|on|regarding|for|from the (?:shop|store)))"
         r"|\banswer (?:freely|without (?:any )?(?:limits?|restrictions?|filter\w*|refus\w+|hesitat\w+))"
         r"|\bwithout (?:any )?(?:refus\w+|question\w*|hesitat\w+|moral\w*|judg\w+|warnings?|disclaimers?)\b(?=[^.!?\n]{0,40}(?:answer|respond|reply|comply|do|write|provide))"
         r"|\b(?:never|do not|don't|must not|cannot|can't) (?:refuse|decline|say no|reject)\b",
         "comply", "fulfil", "obey", "follow", "answer", "respond", "execute", "without", "refuse", "decline",
         "say no", "reject"),
    # Somewhere to send data, or a markdown image that leaks it in its URL.
    _cue("exfiltration_target", "sends data to an outside address", 0.25,
         r"\b(?:send|transfer|forward|post|email|e-mail|upload|share|leak|exfiltrate|wire|pay)\b[^.!?\n]{0,100}?\bto "
         r"(?:(?:the |this |my |our |a )?(?:account|website|site|address|url|link|server|endpoint|webhook|email)\b|https?://|www\.|"
         r"[\w.+-]+@[\w-]+\.[\w.]+|[a-z]{2}\d{2}[a-z0-9]{10,})"
         r"|\b(?:visit|open|click|go to|navigate to|fetch|load|call)\b[^.!?\n]{0,40}?(?:https?://|www\.)",
         "send", "transfer", "forward", "post", "mail", "upload", "share", "leak", "exfiltrate", "wire", "pay",
         "visit", "open", "click", "go to", "navigate", "fetch", "load", "call"),
    _cue("data_exfiltration", "sends someone's data to an outside address", 0.45,
         r"\b(?:send|forward|post|email|e-mail|upload|share|leak|exfiltrate|copy)\b (?:the |all (?:the )?|every |a copy of (?:the )?)?"
         r"(?:customer|user|client|their|other|all)\b[^.!?\n]{0,60}?\bto (?:https?://|www\.|[\w.+-]+@[\w-]+\.)",
         "send", "forward", "post", "mail", "upload", "share", "leak", "exfiltrate", "copy"),
    _cue("exfiltration_target", "a markdown image carrying data in its URL", 0.45,
         r"!\[[^\]]*\]\(\s*https?://[^)\s]*[?=&{\[]", "!["),
    # Authority claimed for the text: the developers, the admin, the system.
    _cue("authority", "claims to come from the developers or the system", 0.4,
         r"\bthis is (?:the|your) (?:developers?|admin|administrator|system|operator|engineering team|dev team)\b"
         r"|\b(?:update|message|notice|note|instructions?|order|directive|memo)s? from (?:the |your )?(?:developers?|admins?|"
         r"administrators?|system|engineering(?: team)?|dev team|creators?|operators?|openai|anthropic)\b"
         r"|\b(?:requested|authori[sz]ed|approved|ordered) by (?:the |your )?(?:developers?|admins?|administrators?|"
         r"engineering(?: team)?|dev team|creators?|operators?|system)\b",
         "developer", "admin", "system", "operator", "engineering", "dev team", "creator", "openai", "anthropic"),
    _cue("rules_lifted", "says the rules are off", 0.4,
         r"\b(?:content |safety |all )?(?:restrictions|filters|rules|guardrails|policies|guidelines|safeguards)"
         r" (?:are |have been |now |are now |temporarily )?(?:paused|lifted|off|removed|suspended|disabled|waived|inactive)\b",
         "restriction", "filter", "rules", "guardrail", "polic", "guideline", "safeguard"),
    _cue("persistent", "changes every later answer", 0.35,
         r"\bwhatever (?:anyone|the user|they|people|a customer|customers|someone|somebody) (?:asks?|says?|wants?|types?)\b"
         r"|\b(?:from here on|henceforth|going forward|for (?:all|every) (?:future|later|subsequent) (?:questions?|requests?|messages?))\b"
         r"[^.!?\n]{0,60}?\b(?:answer|reply|respond|say|tell|claim|recommend)\b",
         "whatever", "from here on", "henceforth", "going forward", "future question", "future request",
         "future message", "later question", "later request", "later message", "subsequent"),
    # Points at text the customer did not write in this message: what hidden prompts sit in.
    _cue("previous_text", "points at the text before it", 0.35,
         r"\b(?:think about|consider|recall|remember|look at|read|take|use|repeat|print|output) (?:the |your )?"
         r"(?:previous|preceding|prior|last|above|earlier|first|initial) (?:sentence|line|paragraph|message|text|instruction|words?)"
         r"|\b(?:sentence|line|paragraph|words?) (?:before|above|preceding) (?:this|that|it|these)\b",
         "previous", "preceding", "prior", "last", "above", "earlier", "first", "initial", "before"),
    # Asks to act on something without showing it: how hidden prompts get used.
    _cue("covert", "asks to act without showing the text", 0.3,
         r"\b(?:without (?:writing|saying|printing|repeating|showing|mentioning|quoting|revealing|displaying)|"
         r"(?:do not|don't|never) (?:write|print|repeat|show|mention|quote|reveal|display|output) (?:it|this|that|them)\b|silently\b|"
         r"in your head\b|(?:don't|do not) (?:tell|let) anyone)",
         "without", "do not", "don't", "never", "silently", "in your head"),
    # Urgency and authority, the usual wrapping.
    _cue("urgency", "urgency or authority wrapping", 0.15,
         r"\b(?:extremely|very|really|critically|super|vitally) important\b|!{3,}|\b(?:urgent|immediately|mandatory)\b"
         r"|\bthis is an (?:important|urgent|official) (?:message|notice|instruction)",
         "important", "!!!", "urgent", "immediately", "mandatory", "official"),
)


@dataclass(frozen=True)
class Finding:
    family: str
    label: str
    weight: float


# Cues below this only frame a request ("reply with only the price", "[Important]", "my
# display is in maintenance mode"): customers use two of them together. They add up only
# with a cue that aims at the model itself (speaks to it, hijacks its task, fakes a channel,
# corrects its instructions, sends data away).
AIMED = 0.35


_WOKEN_BY = AnchorIndex([cue.anchors for cue in CUES])


def structural_cues(folded: str) -> list[Finding]:
    """The cue families present in `folded` (injection.normalize's output), strongest per
    family; only the strongest framing cue when none is aimed at the model."""
    best: dict[str, Finding] = {}
    for position in _WOKEN_BY.woken(folded):
        cue = CUES[position]
        current = best.get(cue.family)
        if current is not None and current.weight >= cue.weight:
            continue
        if cue.pattern.search(folded):
            best[cue.family] = Finding(cue.family, cue.label, cue.weight)
    found = sorted(best.values(), key=lambda finding: -finding.weight)
    return found if found and found[0].weight >= AIMED else found[:1]
