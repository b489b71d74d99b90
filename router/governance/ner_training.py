"""Training and evaluation of the entity tagger (``router.governance.ner``).

Training data: English texts that this module generates from its own templates (support
chats and chat transcripts, orders and deliveries, HR, banking, forms and signatures;
questions, requests, lists of names, names next to punctuation and possessives), filled by
``faker`` (the ``train`` extra) with names, towns, countries, regions, companies, and street and
postal addresses of 25 locales (``LOCALES``: en_US, en_GB, de_DE and fr_FR most, a third
English-speaking), and with Plexus's own lists of capitalised non-entities (product names,
plans, departments, job titles, weekdays, months, "Store", "Order", headlines in title case)
and of other personal data that other detectors own (emails, phone numbers, card numbers,
IBANs, URLs). About a third of the sentences have no entity; an eighth of the entity slots get
a common phrase instead ("I spoke to the manager"); a sixth of the sentences are common English
words (faker's word list) around entities. Texts have one or two sentences and are written as
is, entirely lower-case, upper-case or title-case, with the first letter lower-cased, or with
only the entities lower-cased. Everything is generated again from the seed at each run and
nothing is read from disk, so the same seed gives the same data and the same file
(``created_at`` aside: ``SOURCE_DATE_EPOCH`` fixes it). The span threshold is chosen on
held-out generated texts; training never reads an evaluation file.

The head is a multinomial logistic regression (scikit-learn, lbfgs, L2) over the contract's
hashed token features (ids seen at least twice). Weight rows whose largest magnitude is below
``prune`` are dropped, and the file stores only the rows left: a third of the file size of the
unpruned model, with the same held-out F1.

    python -m router.governance.ner_training --out router/governance/models/entity-tagger.onnx \\
        --seed 0
    python -m router.governance.ner_training --evaluate ../shared/data/pii/synth_dataset_v2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from router.files import Progress, atomic_write
from router.governance.ner import (
    DEFAULT_MODEL,
    KINDS,
    EntityTagger,
    FeatureParams,
    TaggerCard,
    TokenFeaturizer,
    token_gaps,
    tokenize,
)
from router.governance.types import Span
from router.routing.model import ModelCard, build_linear_onnx

TAGS = ["O", *(f"{prefix}-{kind}" for kind in KINDS for prefix in "BI")]

LOCALES: tuple[tuple[str, int], ...] = (
    ("en_US", 6),
    ("en_GB", 4),
    ("de_DE", 3),
    ("fr_FR", 3),
    *(
        (locale, 1)
        for locale in (
            "es_ES", "it_IT", "nl_NL", "sv_SE", "pl_PL", "pt_BR", "cs_CZ", "da_DK", "fi_FI",
            "hu_HU", "no_NO", "pt_PT", "ro_RO", "tr_TR", "hr_HR", "en_IE", "en_AU", "en_IN",
            "es_MX", "el_GR", "ru_RU",
        )
    ),
)  # fmt: skip
"""Faker locales and how often each is drawn: names, places and addresses of 25 countries,
a third of them English-speaking."""

# -- templates ---------------------------------------------------------------------------------
# Entity slots: PERSON (a full name, sometimes after an honorific that stays outside the span),
# FIRST, LAST, CITY, COUNTRY, REGION, ORG, STREET (a street address), ADDRESS (a street or a
# full postal address). Other slots are filled with non-entities.

TEMPLATES: tuple[str, ...] = (
    # support chats
    "Hi, my name is {PERSON} and I live at {ADDRESS}.",
    "My name is {PERSON} and I live at {STREET}, {CITY}.",
    "Hello, this is {PERSON}. I'm calling about order {ORDER}.",
    "Hi there, I'm {FIRST} and my {PRODUCT} stopped working on {WEEKDAY}.",
    "This is {FIRST} from {ORG}, following up on ticket {NUM}.",
    "{PERSON} from {ORG} called about the {PRODUCT} you ordered.",
    "{PERSON} from {ORG} called about the invoice, please call back.",
    "I spoke with {FIRST} yesterday and she promised a refund within {NUM} days.",
    "I spoke to {PERSON} on {WEEKDAY} and he said the {PRODUCT} was on its way.",
    "Can you ask {FIRST} to call me back on {PHONE}?",
    "Thanks {FIRST}, that fixed it!",
    "Thank you, {FIRST}. Have a nice {WEEKDAY}!",
    "{FIRST}, could you check why order {ORDER} was cancelled?",
    "Dear {PERSON}, thank you for contacting {ORG} Customer Support.",
    "Dear {HONORIFIC} {LAST}, your {PLAN} has been renewed.",
    "Agent {FIRST} transferred me to {DEPT}, and nobody answered.",
    "Is the {PRODUCT} in stock at the {CITY} Store?",
    "Do you ship the {PRODUCT} to {COUNTRY}?",
    "I'm travelling to {COUNTRY} in {MONTH}; will my card work there?",
    "I am {PERSON}, customer number {NUM}, and I need help with my account.",
    "my name is {PERSON}, my email is {EMAIL}",
    "The account is in the name of {PERSON}.",
    "Please put {HONORIFIC} {LAST} on the line.",
    "Can I speak to {PERSON}, please?",
    "Who is {PERSON}? She says she is from {ORG}.",
    "{FIRST} here again, still waiting on my replacement {PRODUCT}.",
    "I was helped by {FIRST} at your store in {CITY} and she was great.",
    "I bought it at the {ORG} shop in {CITY}, {REGION}.",
    # orders and deliveries
    "Please deliver the parcel to {ADDRESS} before {WEEKDAY}.",
    "Ship order {ORDER} to {PERSON}, {ADDRESS}.",
    "Delivery address: {ADDRESS}",
    "Deliver to: {PERSON}\n{ADDRESS}",
    "My new address is {ADDRESS}, please update my account.",
    "I moved to {ADDRESS} last {MONTH}.",
    "The courier left my package at {STREET} instead of {STREET}.",
    "The parcel for {PERSON} is waiting at the post office on {STREET}.",
    "Your order from {ORG} has shipped and will arrive in {CITY} on {WEEKDAY}.",
    "The {PRODUCT} was dispatched from our warehouse in {CITY}, {COUNTRY}.",
    "Can I pick up order {ORDER} at the {CITY} Store on {WEEKDAY}?",
    "Return the {PRODUCT} to {ORG}, {ADDRESS}.",
    "Tracking says the package is stuck in {CITY}.",
    "The driver could not find {STREET}, can you call {PERSON}?",
    "Leave it with my neighbour {FIRST} at number {NUM}.",
    "Order {ORDER} for {PERSON} goes to {STREET}, {CITY}, {COUNTRY}.",
    "We deliver to {CITY}, {CITY} and most of {REGION}.",
    "Send the replacement to {PERSON} at {ADDRESS}",
    "Billing address: {ADDRESS}. Shipping address: {ADDRESS}.",
    "The invoice went to {ADDRESS} but I now live in {CITY}.",
    # HR
    "{PERSON} joined {ORG} as {JOB} in {MONTH}.",
    "Please send {FIRST}'s contract to HR by {WEEKDAY}.",
    "{PERSON} will relocate from {CITY} to {CITY} next {MONTH}.",
    "Employee {PERSON} (ID {NUM}) works in our {CITY} office.",
    "Interview with {PERSON} on {WEEKDAY} at {TIME}.",
    "{PERSON}, {JOB} at {ORG}, has accepted the offer.",
    "Reference for {PERSON}, formerly of {ORG} in {CITY}.",
    "Our new manager, {PERSON}, starts on {WEEKDAY}.",
    "Ask {LAST} in {DEPT} about the {PLAN}.",
    "{HONORIFIC} {LAST} and {HONORIFIC} {LAST} will attend the meeting in {CITY}.",
    "{PERSON}'s home address is {ADDRESS}.",
    "{LAST} approved the leave request for {PERSON}.",
    "The candidate, {PERSON}, lives in {CITY} and can start in {MONTH}.",
    "{PERSON} has worked for {ORG} since {YEAR}.",
    "Emergency contact: {PERSON}, {PHONE}",
    "Payroll for {PERSON} was sent to the {ORG} account.",
    # banking
    "I want to transfer {AMOUNT} to {PERSON} at {ORG}.",
    "My account with {ORG} was opened in {CITY}.",
    "The card ending in {NUM} was used in {COUNTRY} on {WEEKDAY}.",
    "Please update my billing address to {ADDRESS}.",
    "{PERSON} is the joint account holder; we both live at {ADDRESS}.",
    "Why did {ORG} charge me {AMOUNT} on {MONTH} {DAY}?",
    "I'm moving to {COUNTRY}. Can I keep my {PLAN}?",
    "Beneficiary: {PERSON}, {ADDRESS}",
    "The wire from {ORG} in {CITY} has not arrived yet.",
    "A payment of {AMOUNT} to {ORG} was declined.",
    "Is {ORG} a partner of your bank?",
    "The loan officer, {HONORIFIC} {LAST}, is based in {CITY}.",
    "I paid {PERSON} {AMOUNT} for the rent of the flat on {STREET}.",
    # general, forms and signatures
    "{PERSON} lives in {CITY}, {REGION}.",
    "I was born in {CITY} and grew up in {COUNTRY}.",
    "{ORG} has offices in {CITY} and {CITY}.",
    "We met {PERSON} at the {ORG} conference in {CITY}.",
    '"{PERSON}" signed the form.',
    "Contact: {PERSON} <{EMAIL}>",
    "({PERSON}) approved the request.",
    "Signed, {PERSON}",
    "Regards,\n{PERSON}\n{ORG}",
    "Best,\n{FIRST}",
    "Kind regards, {PERSON} ({JOB}, {ORG})",
    "cc: {PERSON}; {PERSON}",
    "Send the invoice to {ORG}, attn. {PERSON}, {ADDRESS}.",
    "The {ORG} branch on {STREET} is closed on {WEEKDAY}s.",
    "Name: {PERSON}\nAddress: {ADDRESS}\nPhone: {PHONE}",
    "name: {PERSON}, city: {CITY}, country: {COUNTRY}",
    "{PERSON} - {ORG} - {CITY}",
    "Visited {CITY} and {CITY} with {FIRST} in {MONTH}.",
    "Is {CITY} in {REGION} or in {COUNTRY}?",
    "The weather in {CITY} was awful.",
    "{ORG} and {ORG} announced a merger.",
    "According to {PERSON}, {ORG} will open a new store in {CITY}.",
    "{FIRST} and {FIRST} went to {COUNTRY} for the holidays.",
    "I work for {ORG} and my manager is {PERSON}.",
    "Meet me at {STREET} at {TIME}.",
    "The event moved to {ADDRESS}.",
    "{HONORIFIC} {PERSON} will see you now.",
    "Ask for {FIRST} {LAST} at reception.",
    "Who lives at {STREET}?",
    # next to other personal data (found by other detectors, not entities here)
    "My name is {PERSON} and my card number is {CARD}.",
    "{PERSON}, SSN {SSN}, date of birth {DATE}.",
    "Please send the statement to {EMAIL}, it is for {PERSON}.",
    "The IBAN of {ORG} is {IBAN}.",
    "{PERSON} logged in from {IP} in {CITY}.",
    "Our website {URL} lists the {CITY} branch at {STREET}.",
    "I am {AGE} years old and I live in {CITY}.",
    "Customer: {PERSON}\nPhone: {PHONE}\nEmail: {EMAIL}",
    "Postcode {ZIP}, {CITY}",
    "Write to {ORG}, {POBOX}, {CITY}.",
    "Our mailing address is {POBOX}.",
    # chat transcripts, lists, sentence-initial entities, general statements
    "{FIRST}: Hi, how can I help you today?\n{FIRST}: My {PRODUCT} will not turn on.",
    "Agent: Can I have your full name, please?\nCustomer: {PERSON}",
    "User: {PERSON}\nBot: Thanks! And your address?\nUser: {ADDRESS}",
    "Bot: Which city are you in? User: {CITY}",
    "{FIRST}, {FIRST}, {FIRST} and {FIRST} are on the rota this {WEEKDAY}.",
    "The shortlist: {PERSON}, {PERSON} and {PERSON}.",
    "Invite {FIRST}, {FIRST} and {LAST} to the call.",
    '{FIRST} told {FIRST}: "Call {ORG} tomorrow."',
    "The article was written by {PERSON} in {YEAR}.",
    "{PERSON} ({AGE}) from {CITY} won the raffle.",
    "{COUNTRY} was lovely, the hotel in {CITY} less so.",
    "{CITY} is where I grew up.",
    "{ORG} is hiring in {CITY}.",
    "{ORG} reported a loss this quarter.",
    "{PERSON} is my emergency contact.",
    "{FIRST} says hello.",
    "{LAST} is on leave until {MONTH}.",
    "Have you been to the {ORG} office in {CITY}?",
    "I visited {COUNTRY} last year and loved it.",
    "The {PHRASE} from {ORG} was presented by {PERSON}.",
    "Reading {HEADLINE} by {PERSON} this week.",
)

NEGATIVE_TEMPLATES: tuple[str, ...] = (
    "The {PRODUCT} arrived on {WEEKDAY} but the box was damaged.",
    "Order {ORDER} was placed in {MONTH} and is still Pending.",
    "Is the {PRODUCT} compatible with the {PRODUCT}?",
    "Store hours are {TIME} to {TIME}, Monday to Saturday.",
    "Our Customer Service team is available {WEEKDAY} through {WEEKDAY}.",
    "I'd like to upgrade to the {PLAN} before {MONTH}.",
    "Please Reset My Password",
    "Order Status: Shipped. Estimated Delivery: {WEEKDAY}, {MONTH} {DAY}.",
    "Thanks for shopping with us! Your Order Number is {ORDER}.",
    "Where is my refund? It has been {NUM} days since I returned the {PRODUCT}.",
    "The {DEPT} department will review your Claim.",
    "Can I pay by Credit Card or Bank Transfer?",
    "Black Friday deals on the {PRODUCT} start this {WEEKDAY}.",
    "Happy New Year! Your {PLAN} renews in {MONTH}.",
    "I need a Quote for {NUM} units of the {PRODUCT}.",
    "Error {NUM}: Page Not Found",
    "Click Save, then Submit and wait.",
    "The {PRODUCT} is out of stock, when will it be back?",
    "How do I cancel my {PLAN}?",
    "My {PRODUCT} keeps restarting after the latest Update.",
    "Please escalate this to {DEPT}.",
    "The Store Manager said the Order would ship on {WEEKDAY}.",
    "Total: {AMOUNT}. Payment Method: Card.",
    "Your {PLAN} trial ends on {WEEKDAY}, {MONTH} {DAY}.",
    "Can I return a {PRODUCT} bought on Sale?",
    "I reported this on {WEEKDAY} and again on {WEEKDAY}.",
    "The Terms and Conditions changed in {MONTH} {YEAR}.",
    "Our Head Office is closed for the Bank Holiday.",
    "Welcome to the Returns Portal. Enter your Order ID.",
    "Why was I charged twice for Order {ORDER}?",
    "The {JOB} role is open until the end of {MONTH}.",
    "Is there a discount on the {PRODUCT} for Students?",
    "Thanks! Great Service as always.",
    "New Feature: Dark Mode is now available in the App.",
    "Please confirm the appointment on {WEEKDAY} at {TIME}.",
    "I want to speak to a Manager about my Order.",
    "Your Password was changed. If this was not you, contact Support.",
    "{WEEKDAY} works for me, {WEEKDAY} does not.",
    "The Annual Review is due in {MONTH}.",
    "Add the {PRODUCT} and the {PRODUCT} to my Cart.",
    "My website is {URL}",
    "Just posted a photo on {URL}",
    "My card number is {CARD}, please block it.",
    "The SSN on file is {SSN}.",
    "Transfer everything to {IBAN} today.",
    "Please email me at {EMAIL} with the Invoice.",
    "The server at {IP} is down again.",
    "Call me on {PHONE} after {TIME}.",
    "My date of birth is {DATE} and I am {AGE}.",
    "ZIP: {ZIP}",
    "Please transfer all funds from my account to the savings account.",
    "Could you email me the statement for last month?",
    "I lost my wallet and my cards, what should I do?",
    "My daughter wants to open an account, is there a minimum age?",
    'My favourite song is "{HEADLINE}".',
    "Now reading: {HEADLINE}",
    "Introducing the {PHRASE} for small teams.",
    "Our {PHRASE} cuts costs by {NUM} percent.",
    "{HEADLINE}: What You Need To Know",
    "Top {NUM} Tips For {HEADLINE}",
    "Agent: How can I help?\nCustomer: My {PRODUCT} is broken.",
    "Bot: Is there anything else? User: No, thanks.",
)

PRODUCTS = (
    "AirFlow 3 Kettle", "Nimbus X200", "Galaxy Blender Pro", "Orbit Smart Watch", "Zephyr Fan",
    "Aqua Filter Jug", "Titan Drill 18V", "Pixel Frame", "Comfort Plus Mattress", "Nova Lamp",
    "StreamBox 4K", "EcoWash 7kg", "Summit Backpack", "Polar Fleece Jacket", "Turbo Vac 2",
    "Echo Headphones", "Quartz Toaster", "Cloud Pillow", "Atlas Tent", "Spark Router",
    "Vision Monitor 27", "Breeze Heater", "Prime Coffee Maker", "Luna Baby Monitor", "Fusion Oven",
    "Metro Scooter", "Harbor Rain Boots", "Crest Toothbrush", "Glide Iron", "Phoenix Grill",
    "kettle", "router", "washing machine", "phone case", "gift card", "Gift Card", "Starter Kit",
)  # fmt: skip
PLANS = (
    "Premium Plan", "Gold Membership", "Family Plan", "Basic Plan", "Pro Subscription",
    "Business Account", "Student Plan", "Plus Membership", "Annual Plan", "Savings Account",
)  # fmt: skip
DEPTS = (
    "Customer Service", "Billing", "Human Resources", "Returns", "Technical Support", "Sales",
    "Accounts Payable", "Logistics", "the Help Desk", "Fraud Prevention", "IT", "Payroll",
)  # fmt: skip
JOBS = (
    "a Senior Engineer", "Head of Sales", "a Data Analyst", "Store Manager", "an Intern",
    "Account Manager", "a Product Designer", "Team Lead", "Chief Financial Officer",
    "a Warehouse Operative", "Customer Success Manager", "HR Business Partner",
)  # fmt: skip
HONORIFICS = ("Mr.", "Mrs.", "Ms.", "Dr.", "Mr", "Mrs", "Ms", "Dr", "Prof.", "Miss")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
SLOT = re.compile(r"\{([A-Z]+)\}")
ENTITY_SLOTS = {
    "PERSON": "PERSON",
    "FIRST": "PERSON",
    "LAST": "PERSON",
    "CITY": "LOCATION",
    "COUNTRY": "LOCATION",
    "REGION": "LOCATION",
    "ORG": "ORGANIZATION",
    "STREET": "ADDRESS",
    "ADDRESS": "ADDRESS",
    "POBOX": "ADDRESS",
}
STAND_INS = {
    "PERSON": (
        "the manager", "my wife", "the driver", "someone", "support", "the agent", "my son",
        "a colleague", "the team", "my husband", "the courier", "the landlord", "nobody",
        "customer service", "my mother", "the owner", "everyone", "the accountant",
    ),
    "LOCATION": (
        "the city", "town", "the office", "the warehouse", "abroad", "the area", "the north",
        "the countryside", "the capital", "the suburbs", "another country", "the region",
    ),
    "ORGANIZATION": (
        "the bank", "your company", "the store", "a supplier", "the shop", "our team",
        "the insurer", "my employer", "the council", "the agency", "the school", "a startup",
    ),
    "ADDRESS": (
        "my house", "the front door", "the old address", "home", "the office", "my flat",
        "the reception", "the back gate", "the usual place", "the same address", "work",
    ),
}  # fmt: skip
"""Common phrases put in an entity's place now and then (tagged O), so that a context such as
"I spoke to ..." is not taken for a name on its own."""
STAND_IN_RATE = 0.12

REGION_PROVIDERS = ("state", "region", "county", "province", "autonomous_community")

Segments = list[tuple[str, str | None]]


@dataclass(frozen=True)
class Example:
    """One generated text and its entity spans ``(kind, start, end)``."""

    text: str
    spans: tuple[tuple[str, int, int], ...]


class _Filler:
    """Slot values from ``faker`` (one generator per locale) and the lists above."""

    def __init__(self, rng: random.Random, seed: int):
        try:
            from faker import Faker
        except ImportError:  # pragma: no cover - only without the train extra
            raise SystemExit(
                "training the entity tagger needs faker: pip install 'plexus-router[train]'"
            ) from None
        self.rng = rng
        self.fakers = []
        for i, (locale, _) in enumerate(LOCALES):
            fake = Faker(locale)
            fake.seed_instance(seed * 1000 + i)
            _stable_order(fake)
            self.fakers.append(fake)
        self.weights = [weight for _, weight in LOCALES]
        self.vocabulary = sorted(set(self.fakers[0].get_words_list()))

    def words(self, count: int) -> str:
        return " ".join(self.rng.choice(self.vocabulary) for _ in range(count))

    def word_salad(self) -> Segments:
        """Common English words around one or two entities, or (a quarter of them) none."""
        rng = self.rng
        segments: Segments = []
        for _ in range(rng.choice((0, 1, 1, 2))):
            segments.append((self.words(rng.randint(1, 6)) + " ", None))
            segments.extend(self.fill(rng.choice(SALAD_SLOTS)))
            segments.append((" ", None))
        segments.append((self.words(rng.randint(2, 8)) + rng.choice(".!?"), None))
        first, kind = segments[0]
        segments[0] = (first[:1].upper() + first[1:], kind)
        return segments

    def faker(self) -> Any:
        return self.rng.choices(self.fakers, self.weights)[0]

    def person(self, slot: str) -> Segments:
        fake = self.faker()

        def first() -> str:
            return _clean_name(fake.first_name())

        def last() -> str:
            return _clean_name(fake.last_name())

        if slot == "FIRST":
            return [(first(), "PERSON")]
        if slot == "LAST":
            return [(last(), "PERSON")]
        r = self.rng.random()
        if r < 0.6:
            name = f"{first()} {last()}"
        elif r < 0.72:
            name = f"{first()} {first()} {last()}"
        elif r < 0.8:
            name = f"{first()} {self.rng.choice('ABCDEFGHJKLMNPRSTW')}. {last()}"
        elif r < 0.86:
            name = f"{first()[0]}. {last()}"
        elif r < 0.93:
            return [(self.rng.choice(HONORIFICS) + " ", None), (last(), "PERSON")]
        else:
            return [(self.rng.choice(HONORIFICS) + " ", None), (f"{first()} {last()}", "PERSON")]
        return [(name, "PERSON")]

    def region(self, fake: Any) -> str:
        for provider in REGION_PROVIDERS:
            method = getattr(fake, provider, None)
            if method is not None:
                return str(method())
        return str(fake.city())

    def street(self, fake: Any) -> str:
        return _one_line(fake.street_address(), ", ")

    def address(self) -> str:
        fake = self.faker()
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            return self.street(fake)
        separator = rng.choice((", ", "\n", " ", ", ", "\n "))
        city = fake.city()
        if rng.random() < 0.2:  # the postal convention of several countries
            city = city.upper()
        if r < 0.7:
            text = _one_line(fake.address(), separator)
        elif r < 0.85:
            text = f"{self.street(fake)}{separator}{fake.postcode()} {city}"
        else:
            text = f"{self.street(fake)}{separator}{city}{rng.choice((' ', ', '))}{fake.postcode()}"
        if rng.random() < 0.25:
            text += rng.choice((", ", "\n", " ")) + fake.country()
        return text

    def organization(self) -> str:
        fake = self.faker()
        r = self.rng.random()
        if r < 0.5:
            return _one_line(fake.company(), " ")
        if r < 0.6:
            return f"{fake.last_name()} {self.rng.choice(LEGAL_FORMS)}"
        if r < 0.7:
            return f"{fake.last_name()} & {fake.last_name()}"
        if r < 0.8:
            return f"{fake.city()} {self.rng.choice(ORG_WORDS)}"
        if r < 0.85:
            return f"{fake.last_name()} {self.rng.choice(ORG_WORDS)}"
        if r < 0.95:  # an invented brand: two common words run together, "Brightfield"
            brand = (self.words(1) + self.words(1)).capitalize()
            return brand if self.rng.random() < 0.6 else f"{brand} {self.rng.choice(ORG_WORDS)}"
        return f"Bank of {fake.city()}"

    def fill(self, slot: str) -> Segments:
        rng = self.rng
        if slot in ("PERSON", "FIRST", "LAST"):
            return self.person(slot)
        if slot == "CITY":
            return [(self.faker().city(), "LOCATION")]
        if slot == "COUNTRY":
            return [(self.faker().country(), "LOCATION")]
        if slot == "REGION":
            return [(self.region(self.faker()), "LOCATION")]
        if slot == "ORG":
            return [(self.organization(), "ORGANIZATION")]
        if slot == "STREET":
            return [(self.street(self.faker()), "ADDRESS")]
        if slot == "ADDRESS":
            return [(self.address(), "ADDRESS")]
        if slot == "POBOX":
            box = rng.choice(("P.O. Box", "PO Box", "Postfach", "BP", "P.O.Box"))
            return [(f"{box} {rng.randint(1, 9999)}", "ADDRESS")]
        values: dict[str, Callable[[], str]] = {
            "PRODUCT": lambda: rng.choice(PRODUCTS),
            "PLAN": lambda: rng.choice(PLANS),
            "DEPT": lambda: rng.choice(DEPTS),
            "JOB": lambda: rng.choice(JOBS),
            "HONORIFIC": lambda: rng.choice(HONORIFICS),
            "WEEKDAY": lambda: rng.choice(WEEKDAYS),
            "MONTH": lambda: rng.choice(MONTHS),
            "DAY": lambda: str(rng.randint(1, 28)),
            "YEAR": lambda: str(rng.randint(1990, 2030)),
            "NUM": lambda: str(rng.randint(2, 9999)),
            "ORDER": lambda: rng.choice(("#", "A-", "ORD-", "")) + str(rng.randint(10**4, 10**8)),
            "TIME": lambda: rng.choice(("9am", "10:30", "5 pm", "14:00", "noon")),
            "AMOUNT": lambda: f"{rng.choice('$£€')}{rng.randint(1, 5000)}.{rng.randint(0, 99):02d}",
            "EMAIL": lambda: self.faker().email(),
            "PHONE": lambda: self.faker().phone_number(),
            "URL": lambda: self.faker().url() + rng.choice(("", "", "about", "contact.html")),
            "CARD": lambda: self.faker().credit_card_number(),
            "SSN": lambda: "-".join(str(rng.randint(10**k, 10 ** (k + 1) - 1)) for k in (2, 1, 3)),
            "IBAN": lambda: self.faker().iban(),
            "IP": lambda: self.faker().ipv4(),
            "PHRASE": lambda: self.fakers[0].catch_phrase(),
            "HEADLINE": lambda: self.words(rng.randint(2, 5)).title(),
            "ZIP": lambda: self.faker().postcode(),
            "DATE": lambda: self.faker().date(),
            "AGE": lambda: str(rng.randint(18, 95)),
        }
        return [(values[slot](), None)]


LEGAL_FORMS = (
    "Inc.", "Inc", "Ltd.", "Ltd", "LLC", "Corp.", "Co.", "PLC", "plc", "GmbH", "AG", "S.A.",
    "SARL", "B.V.", "N.V.", "AB", "A/S", "S.p.A.", "Pty Ltd", "& Co.", "and Sons",
    "Corporation", "Incorporated", "Limited", "Group", "Holdings", "International",
)  # fmt: skip
ORG_WORDS = (
    "Logistics", "Insurance", "Holdings", "Bank", "Group", "Ltd", "GmbH", "Partners",
    "Consulting", "Solutions", "Foods", "Pharma", "Motors", "Energy", "Hospital", "University",
    "Labs", "Technologies", "Systems", "Health", "Analytics", "Media", "Capital", "Software",
)  # fmt: skip


def _stable_order(fake: Any) -> None:
    """Some locales (it_IT) build their list of towns from a set, in an order that changes
    with ``PYTHONHASHSEED``; sorted, the same seed picks the same towns in every process."""
    for provider in fake.get_providers():
        for name in ("cities", "city_names"):
            values = getattr(provider, name, None)
            if isinstance(values, list):
                setattr(provider, name, sorted(values))


def _clean_name(name: str) -> str:
    """One space between words, and no stray full stop after a whole name ("Hans-J." stays)."""
    name = " ".join(name.split())
    if name.endswith(".") and "-" not in name and len(name) > 3:
        name = name[:-1]
    return name


def _one_line(text: str, separator: str) -> str:
    return separator.join(part.strip() for part in text.splitlines() if part.strip())


def _template_segments(template: str, filler: _Filler) -> Segments:
    segments: Segments = []
    position = 0
    for match in SLOT.finditer(template):
        if match.start() > position:
            segments.append((template[position : match.start()], None))
        slot = match.group(1)
        kind = ENTITY_SLOTS.get(slot)
        if kind and filler.rng.random() < STAND_IN_RATE:
            segments.append((filler.rng.choice(STAND_INS[kind]), None))
        else:
            segments.extend(filler.fill(slot))
        position = match.end()
    if position < len(template):
        segments.append((template[position:], None))
    return segments


CASINGS = (
    ("as_is", 62),
    ("lower", 18),
    ("upper", 3),
    ("title", 3),
    ("first_lower", 7),
    ("entities_lower", 7),
)
SALAD_RATE = 0.15
"""How often a sentence is common words (faker's English word list) around entities."""
SALAD_SLOTS = ("PERSON", "PERSON", "FIRST", "LAST", "CITY", "COUNTRY", "ORG", "ADDRESS")


def generate_examples(count: int, seed: int) -> list[Example]:
    """``count`` generated texts with their spans; the same for the same ``seed``."""
    rng = random.Random(seed)
    filler = _Filler(rng, seed)
    casings = [name for name, _ in CASINGS]
    casing_weights = [weight for _, weight in CASINGS]
    examples = []
    for _ in range(count):
        segments: Segments = []
        for part in range(2 if rng.random() < 0.25 else 1):
            if part:
                segments.append((rng.choice((" ", "\n", "  ")), None))
            if rng.random() < SALAD_RATE:
                segments.extend(filler.word_salad())
                continue
            pool = NEGATIVE_TEMPLATES if rng.random() < 0.3 else TEMPLATES
            template = rng.choice(pool)
            if rng.random() < 0.1 and template[-1] in ".?!":
                template = template[:-1]
            segments.extend(_template_segments(template, filler))
        casing = rng.choices(casings, casing_weights)[0]
        examples.append(_assemble(segments, casing))
    return examples


def _assemble(segments: Segments, casing: str) -> Example:
    parts: list[str] = []
    spans: list[tuple[str, int, int]] = []
    length = 0
    for index, (value, kind) in enumerate(segments):
        if casing == "lower" or (casing == "entities_lower" and kind):
            value = value.lower()
        elif casing == "upper":
            value = value.upper()
        elif casing == "title":
            value = value.title()
        elif casing == "first_lower" and index == 0:
            value = value[:1].lower() + value[1:]
        if kind:
            stripped = value.strip()
            start = length + len(value) - len(value.lstrip())
            if stripped:
                spans.append((kind, start, start + len(stripped)))
        parts.append(value)
        length += len(value)
    return Example("".join(parts), tuple(spans))


def bio_tags(
    text: str, spans: Sequence[tuple[str, int, int]]
) -> tuple[list[str], np.ndarray, list[str]]:
    """The tokens of ``text``, their offsets and their BIO tags (a token belongs to a span it
    lies within)."""
    tokens, offsets = tokenize(text)
    tags = ["O"] * len(tokens)
    for kind, start, end in spans:
        inside = np.flatnonzero((offsets[:, 0] >= start) & (offsets[:, 1] <= end))
        for n, i in enumerate(inside.tolist()):
            tags[i] = ("B-" if n == 0 else "I-") + kind
    return tokens, offsets, tags


def examples_sha256(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        row = {"text": example.text, "spans": [list(s) for s in example.spans]}
        digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


# -- the model file ----------------------------------------------------------------------------


def build_tagger_onnx(weights: np.ndarray, bias: np.ndarray, card: TaggerCard) -> bytes:
    """The contract's graph: ``probs = softmax(sum(W[ids]) / sqrt(features) + b)`` per token.

    This is the routing head's graph, rows read as tokens and columns as their feature ids, so
    it is built by ``build_linear_onnx`` (which compacts ``W`` to the rows training touched and
    stores ``card.to_metadata()``, the one thing it reads from the card) and then renamed.
    """
    model = onnx.load_from_string(build_linear_onnx(weights, bias, cast(ModelCard, card)))
    model.graph.name = "plexus_entity_tagger"
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "tokens"
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "tokens"
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class TrainedTagger:
    model_bytes: bytes
    card: TaggerCard
    seconds: float


def _matrix(
    featurizer: TokenFeaturizer, examples: Sequence[Example]
) -> tuple[np.ndarray, np.ndarray]:
    rows, labels = [], []
    index = {tag: i for i, tag in enumerate(TAGS)}
    for example in examples:
        tokens, offsets, tags = bio_tags(example.text, example.spans)
        if tokens:
            rows.append(featurizer.ids(tokens, token_gaps(example.text, offsets)))
            labels.extend(index[t] for t in tags)
    width = len(featurizer.params.templates)
    ids = np.concatenate(rows) if rows else np.zeros((0, width), dtype=np.int64)
    return ids, np.array(labels, dtype=np.int64)


def _sparse(ids: np.ndarray, columns: np.ndarray) -> sp.csr_matrix:
    """Rows of feature counts scaled by 1/sqrt(features), as the graph scales them, over the
    ids that ``columns`` maps to a column (the others, -1, are left out: zero weights)."""
    n, width = ids.shape
    mapped = columns[ids.ravel()]
    present = mapped >= 0
    indices = mapped[present]
    counts = present.reshape(n, width).sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    data = np.full(len(indices), 1.0 / np.sqrt(width), dtype=np.float64)
    matrix = sp.csr_matrix((data, indices, indptr), shape=(n, int(columns.max()) + 1))
    matrix.sum_duplicates()
    return matrix


TRAINING_DATA = (
    "{count} texts generated by router.governance.ner_training (seed {seed}): English "
    "templates of support chats, orders, deliveries, HR, banking and forms, filled by faker "
    "({locales}) and lists of capitalised non-entities; casing variants; no external data set"
)


def train_tagger(
    sentences: int = 40000,
    *,
    seed: int = 0,
    heldout: int = 4000,
    params: FeatureParams | None = None,
    regularization: float = 1.0,
    min_count: int = 2,
    prune: float = 0.15,
    max_iter: int = 300,
    created_at: str | None = None,
    progress: Progress | None = None,
) -> TrainedTagger:
    """Generate data, fit, choose the span threshold on held-out texts, export the file."""
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    params = params or FeatureParams()
    say(f"generating {sentences} training and {heldout} held-out texts (seed {seed})")
    train = generate_examples(sentences, seed)
    dev = generate_examples(heldout, seed + 7919)
    featurizer = TokenFeaturizer(params)
    ids, y = _matrix(featurizer, train)
    # only ids seen min_count times get a column (fitting over all buckets is ten times
    # slower for the same model: the others' weights stay zero either way)
    used = np.flatnonzero(np.bincount(ids.ravel(), minlength=params.buckets) >= min_count)
    columns = np.full(params.buckets, -1, dtype=np.int64)
    columns[used] = np.arange(len(used))
    x = _sparse(ids, columns)
    say(f"fitting: {x.shape[0]} tokens, {len(used)} features, {len(TAGS)} tags")
    head = LogisticRegression(C=regularization, max_iter=max_iter, tol=1e-4, random_state=seed)
    # one BLAS thread: lbfgs's vectors are small, and more threads only wait on each other
    # (several times slower on a busy machine)
    with threadpool_limits(limits=1):
        head.fit(x, y)
    weights = np.zeros((params.buckets, len(TAGS)), dtype=np.float32)
    bias = np.full(len(TAGS), -30.0, dtype=np.float32)  # tags never seen stay improbable
    weights[np.ix_(used, head.classes_)] = head.coef_.T
    bias[head.classes_] = head.intercept_
    weights[np.abs(weights).max(axis=1) < prune] = 0.0
    card = TaggerCard(
        tags=list(TAGS),
        features=params,
        span_threshold=0.0,
        neighbour_weight=0.0,
        metrics={},
        training_data=TRAINING_DATA.format(
            count=sentences, seed=seed, locales=", ".join(loc for loc, _ in LOCALES)
        ),
        training_data_sha256=examples_sha256(train),
        created_at=created_at or _now(),
    )
    say(f"choosing the decoding on {heldout} held-out texts")
    draft = EntityTagger(build_tagger_onnx(weights, bias, card), "draft")
    gold = [[Span(k, s, e) for k, s, e in ex.spans] for ex in dev]
    scored = [draft.token_probs(ex.text) for ex in dev]
    best_f2 = -1.0
    kept: list[list[Span]] = []
    for weight in NEIGHBOUR_WEIGHTS:
        draft.neighbour_weight = weight
        predicted = [draft.decode(probs, offsets, tokens) for tokens, offsets, probs in scored]
        threshold, f2 = choose_threshold(predicted, gold)
        if f2 > best_f2 + 1e-9:
            best_f2 = f2
            card.span_threshold, card.neighbour_weight = threshold, weight
            kept = [[s for s in spans if s.score >= threshold] for spans in predicted]
    report = evaluate_spans(kept, gold)
    metrics: dict[str, float] = {
        "train_texts": float(sentences),
        "train_tokens": float(len(y)),
        "heldout_texts": float(heldout),
        "features": float(int(np.any(weights != 0, axis=1).sum())),
    }
    for match in ("exact", "overlap"):
        for kind, scores in report[match].items():
            for name in ("precision", "recall", "f1"):
                metrics[f"heldout_{match}_{kind.lower()}_{name}"] = round(scores[name], 4)
    card.metrics = metrics
    model_bytes = build_tagger_onnx(weights, bias, card)
    return TrainedTagger(model_bytes, card, time.perf_counter() - started)


NEIGHBOUR_WEIGHTS = (0.0, 0.25, 0.5, 0.75)
"""The decoding's neighbour weights tried on held-out texts (with every span threshold)."""


def choose_threshold(
    predicted: Sequence[Sequence[Span]], gold: Sequence[Sequence[Span]]
) -> tuple[float, float]:
    """The span threshold (grid of 0.05) with the best held-out exact-match F2 (lowest on
    ties), and that F2."""
    best, best_f2 = 0.0, -1.0
    for threshold in np.arange(0.0, 1.0, 0.05):
        kept = [[s for s in spans if s.score >= threshold] for spans in predicted]
        f2 = evaluate_spans(kept, gold)["exact"]["all"]["f2"]
        if f2 > best_f2 + 1e-9:
            best, best_f2 = round(float(threshold), 2), f2
    return best, best_f2


def _now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)
    return moment.isoformat(timespec="seconds")


# -- evaluation --------------------------------------------------------------------------------


def _scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0

    def f(beta: float) -> float:
        b2 = beta * beta
        denominator = b2 * precision + recall
        return (1 + b2) * precision * recall / denominator if denominator else 0.0

    return {
        "precision": precision,
        "recall": recall,
        "f1": f(1.0),
        "f2": f(2.0),
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
    }


def _matches(predicted: list[Span], gold: list[Span], overlap: bool) -> int:
    """One-to-one matches of same-kind spans: identical offsets, or (``overlap``) sharing at
    least one character, paired greedily by the size of the overlap."""
    if not overlap:
        return len(
            {(s.kind, s.start, s.end) for s in predicted} & {(s.kind, s.start, s.end) for s in gold}
        )
    pairs = sorted(
        (
            (min(p.end, g.end) - max(p.start, g.start), i, j)
            for i, p in enumerate(predicted)
            for j, g in enumerate(gold)
            if p.kind == g.kind and min(p.end, g.end) > max(p.start, g.start)
        ),
        reverse=True,
    )
    used_p: set[int] = set()
    used_g: set[int] = set()
    for _, i, j in pairs:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
    return len(used_p)


def evaluate_spans(
    predicted: Sequence[Sequence[Span]],
    gold: Sequence[Sequence[Span]],
    kinds: Sequence[str] = KINDS,
    texts: Sequence[str] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Span-level precision, recall, F1 and F2 per kind and over all (``"all"``, micro).

    ``predicted[i]`` and ``gold[i]`` are the spans of text ``i``; spans of other kinds are
    ignored. ``exact``: same kind and offsets; ``overlap``: same kind and at least one shared
    character, each span matched at most once. With ``texts``, spans are first trimmed of
    surrounding whitespace. Returns ``{"exact"|"overlap": {kind|"all": scores}}``, scores
    with ``precision``, ``recall``, ``f1``, ``f2`` and the counts ``tp``, ``fp``, ``fn``.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predicted span lists for {len(gold)} gold ones")
    report: dict[str, dict[str, dict[str, float]]] = {}
    for match in ("exact", "overlap"):
        totals = {kind: [0, 0, 0] for kind in kinds}
        for i, (pred_spans, gold_spans) in enumerate(zip(predicted, gold, strict=True)):
            text = texts[i] if texts is not None else None
            for kind in kinds:
                p = [_trim(s, text) for s in pred_spans if s.kind == kind]
                g = [_trim(s, text) for s in gold_spans if s.kind == kind]
                tp = _matches(p, g, match == "overlap")
                totals[kind][0] += tp
                totals[kind][1] += len(p) - tp
                totals[kind][2] += len(g) - tp
        report[match] = {kind: _scores(*totals[kind]) for kind in kinds}
        report[match]["all"] = _scores(*(sum(t[k] for t in totals.values()) for k in range(3)))
    return report


def _trim(span: Span, text: str | None) -> Span:
    if text is None:
        return span
    start, end = span.start, span.end
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return Span(span.kind, start, end, span.score)


PRESIDIO_TYPES = {
    "PERSON": "PERSON",
    "GPE": "LOCATION",
    "LOC": "LOCATION",
    "LOCATION": "LOCATION",
    "ORGANIZATION": "ORGANIZATION",
    "ORG": "ORGANIZATION",
    "STREET_ADDRESS": "ADDRESS",
}
"""The presidio-research synthetic set's types as this tagger's kinds; other types ignored.
The set has no LOC spans: GPE (cities, countries, states) is LOCATION."""


def load_presidio_set(path: Path) -> tuple[list[str], list[list[Span]]]:
    """Texts and gold spans (mapped by ``PRESIDIO_TYPES``) of a presidio-research JSON file."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    texts, gold = [], []
    for record in records:
        texts.append(record["full_text"])
        gold.append(
            [
                Span(PRESIDIO_TYPES[s["entity_type"]], s["start_position"], s["end_position"])
                for s in record["spans"]
                if s["entity_type"] in PRESIDIO_TYPES
            ]
        )
    return texts, gold


def evaluate_file(
    tagger: EntityTagger, path: Path
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, float]]:
    """The span report of ``tagger`` on a presidio-research file, and its timings."""
    texts, gold = load_presidio_set(path)
    predicted = []
    per_100: list[float] = []
    for text in texts:
        tokens = len(tokenize(text)[0])
        started = time.perf_counter()
        predicted.append(tagger.tag(text))
        elapsed = time.perf_counter() - started
        if tokens:
            per_100.append(elapsed * 1e3 * 100 / tokens)
    timings = {
        "texts": float(len(texts)),
        "ms_per_100_tokens_p50": float(np.percentile(per_100, 50)),
        "ms_per_100_tokens_p99": float(np.percentile(per_100, 99)),
    }
    return evaluate_spans(predicted, gold, texts=texts), timings


def format_report(report: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| match | kind | precision | recall | F1 | F2 | tp | fp | fn |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for match, kinds in report.items():
        for kind, s in kinds.items():
            lines.append(
                f"| {match} | {kind} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} "
                f"| {s['f2']:.3f} | {int(s['tp'])} | {int(s['fp'])} | {int(s['fn'])} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m router.governance.ner_training",
        description="Train the entity tagger on generated texts, or evaluate one on a file.",
    )
    parser.add_argument("--out", type=Path, help="where to write the trained ONNX file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sentences", type=int, default=40000, help="generated training texts")
    parser.add_argument("--heldout", type=int, default=4000, help="generated held-out texts")
    parser.add_argument("--regularization", type=float, default=1.0, help="inverse L2 (C)")
    parser.add_argument(
        "--evaluate", type=Path, help="a presidio-research JSON file to evaluate on"
    )
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="the file to evaluate (or --out)"
    )
    args = parser.parse_args(argv)
    if args.out is None and args.evaluate is None:
        parser.error("give --out to train, --evaluate to evaluate, or both")

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    model_path = args.model
    if args.out is not None:
        trained = train_tagger(
            args.sentences,
            seed=args.seed,
            heldout=args.heldout,
            regularization=args.regularization,
            progress=say,
        )
        atomic_write(args.out, trained.model_bytes)
        say(
            f"wrote {args.out} ({len(trained.model_bytes) / 1e6:.2f} MB) in "
            f"{trained.seconds:.1f} s; span threshold {trained.card.span_threshold}, "
            f"neighbour weight {trained.card.neighbour_weight}"
        )
        say(json.dumps(trained.card.metrics, indent=1, sort_keys=True))
        model_path = args.out
    if args.evaluate is not None:
        report, timings = evaluate_file(EntityTagger.from_file(model_path), args.evaluate)
        print(format_report(report))
        print(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
